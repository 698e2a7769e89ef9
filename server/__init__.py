"""loraplex: a multi-adapter LoRA inference server (import name `server`).

Layers, importing one way: api → registry → engine → model. See README.md.
"""

__version__ = "0.1.0"
