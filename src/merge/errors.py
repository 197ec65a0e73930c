"""Errors raised for bad merge inputs. Every message names the offending file."""
from __future__ import annotations


class MergeInputError(ValueError):
    """An input (task model, base model, config) cannot be merged as given.

    The message always names the file (or directory) and the problem, e.g.
    ``/ckpt/cars/adapter_model.safetensors: tensor 'x.lora_A.weight' has shape (16, 768),
    expected (16, 512) as in /ckpt/dtd/adapter_model.safetensors``.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
