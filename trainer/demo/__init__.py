"""The built-in demo: its style dataset, the plain scenes demo:shapes was pretrained on, and the style and
content scores (docs/DEMO_MODEL.md, docs/QUALITY.md)."""
