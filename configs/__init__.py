"""Reusable presets (model shapes, meshes, data, PEFT recipes). Imports jrlhf, never the reverse."""
