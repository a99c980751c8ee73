"""Tests that run ComfyUI's own server (main.py) with ondevice inside it."""
