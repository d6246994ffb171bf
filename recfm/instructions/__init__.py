"""Task families, prompt templates (seen and held-out), the serializer that turns a user's history into a multimodal prompt, and the chat template."""
