"""Frozen teachers: wrapped upstream models that return logits plus requested feature taps."""

from teachers.hf_vlm import HFVLMTeacher, TeacherOutput

__all__ = ["HFVLMTeacher", "TeacherOutput"]
