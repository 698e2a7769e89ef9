"""The `loraplex` command: a table of subcommands, each a plain function.

Owns: argument parsing, turning flags into config overrides (flags win over
the environment, which wins over the file), logging set-up, and the process
environment that keeps every load offline. Subcommands for training, merging
and blending join this table with their issues.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .config import load_config
from .errors import ConfigError
from .logs import setup_logging


def _config_path(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    default = Path("config.toml")
    return default if default.is_file() else None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .model import check_source

    overrides = {
        "server.host": args.host, "server.port": args.port, "model.model": args.model,
        "model.dtype": args.dtype, "model.quantization": args.quantization,
        "model.attn_implementation": args.attn_implementation, "model.device": args.device,
        "adapters.dir": args.adapters_dir, "server.log_format": args.log_format,
    }
    cfg = load_config(_config_path(args.config), environ=os.environ, overrides=overrides)
    if args.model and not Path(args.model).is_absolute() and args.model != "default":
        cfg.model.model = str(Path(args.model).resolve())  # a flag's path is relative to where it was typed
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    check_source(cfg.model)  # a wrong --model fails here, not after the server is up
    app = create_app(cfg, exit_on_load_failure=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler
    # that was there before it; this one turns that into exit status 0, or 1 when the
    # shutdown came from a failed start-up (the model did not load).
    state = app.state.loraplex
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1 if state.load_error else 0))
    uvicorn.run(app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level, log_config=None,
                timeout_graceful_shutdown=30)
    return 0


COMMANDS = {"serve": cmd_serve}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loraplex", description="Multi-adapter LoRA inference server")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    s.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--model", help="default | a transformers model folder | a .gguf file")
    s.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"])
    s.add_argument("--attn-implementation", choices=["sdpa", "eager", "flash_attention_2"])
    s.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    s.add_argument("--adapters-dir", help="the adapter store folder")
    s.add_argument("--log-format", choices=["text", "json"])
    return p


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever fetched at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging("info")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"loraplex: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
