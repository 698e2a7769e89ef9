"""The `loraplex` command: a table of subcommands, each a plain function.

Owns: argument parsing, turning flags into config overrides (flags win over
the environment, which wins over the file), logging set-up, the process
environment that keeps every load offline, and how offline commands report
(a progress bar for people, JSON lines with `--progress json` for the job
runner). The work itself lives in `training/`, `merge.py` and `lora/blend.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
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
    from .drain import DrainingServer
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
    # SIGTERM drains (server/drain.py), then uvicorn shuts down and re-raises the signal to
    # the handler that was there before it; this one turns that into exit status 0, or 1 when
    # the shutdown came from a failed start-up (the model did not load).
    state = app.state.loraplex
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1 if state.load_error else 0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(1 if state.load_error else 0))
    config = uvicorn.Config(app, host=cfg.server.host, port=cfg.server.port, log_level=cfg.server.log_level,
                            log_config=None, timeout_graceful_shutdown=10)
    DrainingServer(config, state, cfg.server.drain_timeout_s).run()
    return 0


def _offline_config(args: argparse.Namespace, extra: dict | None = None):
    overrides = {"model.model": args.base, "model.quantization": getattr(args, "quantization", None),
                 "model.dtype": getattr(args, "dtype", None), "adapters.dir": args.adapters_dir, **(extra or {})}
    cfg = load_config(_config_path(args.config), environ=os.environ, overrides=overrides)
    if args.base and args.base != "default":
        cfg.model.model = str(Path(args.base).resolve())
    return cfg


def _reporter(mode: str):
    """JSON lines on stdout for the job runner; short human lines on stderr otherwise."""
    def report(event: dict) -> None:
        if mode == "json":
            print(json.dumps(event, default=str), flush=True)
        elif event.get("event") not in ("progress", "start"):
            shown = {k: v for k, v in event.items() if k not in ("event", "card")}
            print(f"[{event.get('event')}] {json.dumps(shown, default=str)}", file=sys.stderr, flush=True)
    return report


def _stop_on_sigterm() -> threading.Event:
    """SIGTERM/SIGINT ask for a stop at the next safe point (a checkpoint), not a kill."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _admin_call(cfg, url: str, method: str, path: str, body: dict, what: str) -> dict:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method=method)
    if cfg.admin_token():
        req.add_header("Authorization", f"Bearer {cfg.admin_token()}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read() or b"{}")
            print(f"{what} with {url} ({r.status})", file=sys.stderr)
            return answer
    except (urllib.error.URLError, OSError, ValueError) as e:
        detail = e.read().decode(errors="replace") if isinstance(e, urllib.error.HTTPError) else str(e)
        raise SystemExit(f"loraplex: {what} failed with {url}: {detail}") from None


def _register(cfg, name: str, url: str | None, alias: str | None = None) -> None:
    """Hot-load a new adapter into a running server through its admin API (and point an alias at it)."""
    url = (url or f"http://{cfg.server.host}:{cfg.server.port}").rstrip("/")
    entry = _admin_call(cfg, url, "POST", "/admin/adapters", {"name": name, "path": name}, f"registered {name}")
    if alias:
        version = entry.get("version") or entry.get("adapter", {}).get("version")
        target = f"{name}@{version}" if version else name
        _admin_call(cfg, url, "PUT", f"/admin/aliases/{alias}", {"target": target}, f"alias {alias} -> {target}")


def cmd_train(args: argparse.Namespace) -> int:
    from .training.data import DataError
    from .training.trainer import TrainingError, TrainOptions, train

    cfg = _offline_config(args)
    t = cfg.train
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    targets = args.target_modules.split(",") if args.target_modules else (t.target_modules or None)
    opts = TrainOptions(
        data=Path(args.data), name=args.name, rank=pick(args.rank, t.rank), alpha=pick(args.alpha, t.alpha),
        dropout=pick(args.dropout, t.dropout), target_modules=targets, learning_rate=pick(args.lr, t.learning_rate),
        warmup_ratio=args.warmup_ratio, epochs=pick(args.epochs, t.epochs), max_steps=args.max_steps,
        batch_size=pick(args.batch_size, t.batch_size), grad_accum=pick(args.grad_accum, t.grad_accum),
        max_seq_len=pick(args.max_seq_len, t.max_seq_len), eval_fraction=pick(args.eval_fraction, t.eval_fraction),
        seed=pick(args.seed, t.seed), qlora=args.qlora, loftq=args.loftq, loftq_examples=args.loftq_examples,
        dora=args.dora, rslora=args.rslora,
        modules_to_save=args.modules_to_save.split(",") if args.modules_to_save else None,
        gradient_checkpointing=args.gradient_checkpointing,
        precision=args.precision, optim=args.optim, save_steps=pick(args.save_steps, t.save_steps),
        resume=args.resume, long_examples=args.long_examples, replace=args.replace, promote_if=args.promote_if)
    from .errors import LoraplexError
    from .registry import check_name
    from .training.gate import GateError

    if args.alias and not args.register:
        print("loraplex train: --alias flips an alias on a running server; it needs --register", file=sys.stderr)
        return 2
    try:
        check_name(opts.name)
        if args.alias:
            check_name(args.alias, param="alias")
        card = train(opts, cfg.model, store=cfg.path(cfg.adapters.dir), cache_dir=cfg.path(cfg.model.cache_dir),
                     report=_reporter(args.progress), stop=_stop_on_sigterm(), quiet=args.progress == "json")
    except (DataError, TrainingError, LoraplexError, GateError) as e:
        msg = getattr(e, "message", None) or str(e)
        print(f"loraplex train: {msg}", file=sys.stderr)
        return 3 if isinstance(e, TrainingError) and "stopped at step" in msg else 1
    promotion = card.get("promotion")
    if promotion is not None and not promotion["passed"]:
        from .jobs import NOT_PROMOTED_EXIT
        from .training.trainer import unpromoted_dir

        print(f"loraplex train: not promoted: {promotion['reason']}; the adapter is kept in "
              f"{unpromoted_dir(cfg.path(cfg.adapters.dir), opts.name)} and nothing was registered", file=sys.stderr)
        return NOT_PROMOTED_EXIT
    if args.register:
        _register(cfg, opts.name, args.server, args.alias)
    return 0


def _adapter_folder(cfg, spec: str) -> Path:
    """A store name, or a folder path."""
    store = cfg.path(cfg.adapters.dir)
    if (store / spec / "adapter_config.json").is_file() and "/" not in spec:
        return store / spec
    return Path(spec).resolve()


def cmd_merge(args: argparse.Namespace) -> int:
    from .errors import LoraplexError
    from .merge import ExportError, fuse

    cfg = _offline_config(args)
    try:
        fuse(_adapter_folder(cfg, args.adapter), Path(args.out).resolve(), cfg.model,
             cache_dir=cfg.path(cfg.model.cache_dir), tolerance=args.tolerance, replace=args.replace,
             report=_reporter(args.progress))
    except (ExportError, LoraplexError) as e:
        print(f"loraplex merge: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    return 0


def cmd_blend(args: argparse.Namespace) -> int:
    from .errors import LoraplexError
    from .lora.blend import blend_into_store

    cfg = _offline_config(args)
    try:
        parts = []
        for item in args.parts:
            name, sep, weight = item.partition("=")
            if not sep:
                raise SystemExit(f"loraplex blend: expected NAME=WEIGHT, got {item!r}")
            parts.append((name, float(weight)))
        path = blend_into_store(cfg.model, cfg.path(cfg.model.cache_dir), cfg.path(cfg.adapters.dir), args.name,
                                parts, args.type, args.density)
    except (LoraplexError, ValueError) as e:
        print(f"loraplex blend: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_ray(args: argparse.Namespace) -> int:
    """Serve through Ray Serve: N replicas behind an adapter-affinity router (needs loraplex[ray])."""
    try:
        import ray
        from ray import serve
    except ImportError:
        print("loraplex ray: Ray Serve is not installed: pip install 'loraplex[ray]'", file=sys.stderr)
        return 2
    from .scaleout import build_app

    cfg = load_config(_config_path(args.config), environ=os.environ)
    setup_logging(cfg.server.log_level, cfg.server.log_format)
    ray.init(address=args.address, num_cpus=args.num_cpus)
    serve.start(http_options={"host": args.host or cfg.server.host, "port": args.port or cfg.server.port})
    app = build_app({"config": str(cfg.source) if cfg.source else None, "replicas": args.replicas,
                     "cpus_per_replica": args.cpus_per_replica,
                     "max_adapters_per_replica": args.max_adapters_per_replica})
    serve.run(app, name="loraplex", route_prefix="/", blocking=True)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cli_eval import run

    return run(args, _offline_config(args), _adapter_folder, _reporter(args.progress))


COMMANDS = {"serve": cmd_serve, "train": cmd_train, "eval": cmd_eval, "merge": cmd_merge, "blend": cmd_blend,
            "ray": cmd_ray}


def _offline_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    p.add_argument("--base", help="the base model: default | a transformers folder | a .gguf file")
    p.add_argument("--adapters-dir", help="the adapter store folder")
    p.add_argument("--progress", choices=["bar", "json"], default="bar", help="json: one event per line on stdout")


def _train_parser(sub) -> None:
    from .training import defaults

    t = sub.add_parser("train", help="train a LoRA/QLoRA adapter into the store")
    t.add_argument("data", help="JSONL: {messages} | {prompt, completion} | {text} per line")
    t.add_argument("--name", required=True, help="the adapter's name (its folder in the store)")
    _offline_flags(t)
    t.add_argument("--rank", type=int)
    t.add_argument("--alpha", type=int)
    t.add_argument("--dropout", type=float)
    t.add_argument("--target-modules", help="comma-separated module names, or a preset: default (the family's "
                   "attention and MLP projections), attention, mlp, all-linear")
    t.add_argument("--epochs", type=float)
    t.add_argument("--max-steps", type=int, default=-1, help="> 0: stop after this many steps (overrides --epochs)")
    t.add_argument("--lr", type=float, help="peak learning rate")
    t.add_argument("--warmup-ratio", type=float, default=defaults.WARMUP_RATIO)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--grad-accum", type=int, help="gradient accumulation steps")
    t.add_argument("--max-seq-len", type=int)
    t.add_argument("--long-examples", choices=["error", "skip", "truncate"], default="error")
    t.add_argument("--eval-fraction", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--save-steps", type=int, help="checkpoint every N steps")
    t.add_argument("--qlora", action="store_true", help="train on a bitsandbytes nf4 base")
    t.add_argument("--loftq", action="store_true", help="with --qlora: start LoRA as the rank-r fix of nf4's error "
                   "that best restores each layer's outputs (QLoRA then reaches LoRA's eval loss; the adapter "
                   "belongs to the nf4 base: serve it with --quantization nf4)")
    t.add_argument("--loftq-examples", type=int, default=defaults.LOFTQ_EXAMPLES, metavar="N",
                   help="with --loftq: the fix that best restores each layer's outputs on N training records "
                   "(0: the plain SVD fix of the weights)")
    t.add_argument("--dora", action="store_true", help="DoRA: LoRA with a learned magnitude per output row")
    t.add_argument("--rslora", action="store_true", help="rank-stabilised scaling: alpha / sqrt(rank)")
    t.add_argument("--modules-to-save", help="comma-separated modules trained in full beside the LoRA (lm_head, "
                   "embed_tokens, norm: the ones loraplex serves)")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    t.add_argument("--optim", default="auto", help="a transformers optimizer name (default: per device)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    t.add_argument("--replace", action="store_true", help="replace an adapter of the same name in the store")
    t.add_argument("--register", action="store_true", help="hot-load the result into a running server")
    t.add_argument("--server", help="the running server's URL for --register (default: from the config)")
    t.add_argument("--promote-if", metavar="GATE", help="publish (and --register) only if the held-out split "
                   "says so, e.g. 'eval_loss<0.8*base' or 'exact_match>=0.9'; otherwise keep it aside, exit 4")
    t.add_argument("--alias", help="with --register: point this alias at the new version once it serves")


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
    _train_parser(sub)
    from .cli_eval import add_parser

    add_parser(sub, _offline_flags)
    m = sub.add_parser("merge", help="fuse an adapter or blend into the base and export a model folder")
    m.add_argument("adapter", help="a name in the store, or an adapter folder")
    m.add_argument("--out", required=True, help="the model folder to write")
    _offline_flags(m)
    m.add_argument("--quantization", choices=["none", "nf4", "fp4", "int8"],
                   help="the base as it is served (a quantized one is dequantized for the export)")
    m.add_argument("--tolerance", type=float, help="largest |logit difference| accepted (default: by dtype)")
    m.add_argument("--replace", action="store_true")
    b = sub.add_parser("blend", help="write a weighted blend of store adapters into the store")
    b.add_argument("parts", nargs="+", metavar="NAME=WEIGHT")
    b.add_argument("--name", required=True)
    b.add_argument("--type", default="linear", help="a PEFT combination type (linear, cat, svd, ties, ...)")
    b.add_argument("--density", type=float, help="for ties, dare_* and magnitude_prune")
    _offline_flags(b)
    r = sub.add_parser("ray", help="serve N replicas on Ray Serve with adapter-affinity routing")
    r.add_argument("--config", help="TOML config file (default: ./config.toml if present)")
    r.add_argument("--host")
    r.add_argument("--port", type=int)
    r.add_argument("--replicas", type=int, default=2)
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved by each replica")
    r.add_argument("--max-adapters-per-replica", type=int, default=8, help="Ray's multiplex LRU size")
    r.add_argument("--address", help="an existing Ray cluster (default: start one on this machine)")
    r.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    return p


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever fetched at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging("info")
    from .jobs import stop_with_parent

    stop_with_parent()  # a no-op unless this process is a server's background job
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"loraplex: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
