"""Task families, prompt templates (seen and held-out), the serializer that turns a user's history
into a multimodal prompt (`chat.render`), and the example builders."""

from .chat import Encoded, Item, PromptTooLong, RenderContext, render
from .examples import (TASKS, build_eval_examples, build_id_sequence_examples, build_pretraining_examples,
                       build_training_examples)
from .templates import Template, fill, load_templates

__all__ = ["Encoded", "Item", "PromptTooLong", "RenderContext", "TASKS", "Template", "build_eval_examples",
           "build_id_sequence_examples", "build_pretraining_examples", "build_training_examples", "fill", "load_templates", "render"]
