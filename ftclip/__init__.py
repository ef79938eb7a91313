"""ftclip: YAML-driven LoRA/QLoRA fine-tuning with a fast, visible gradient-clipping step."""

__version__ = "0.1.0"
