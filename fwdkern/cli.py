"""Command line: ``python -m fwdkern <command>`` (also installed as ``fwdkern``).

Commands:
  demo          the README's main job: federated forward-gradient fine-tuning of the
                bundled all-MiniLM-L6-v2 on BBC News (100 simulated clients, 10 per
                round) on this machine's CPU; a few minutes, progress bar, final accuracy.
  train         the same runner with every option (see `fwdkern train --help`).
  bench-seeded  time seeded_axpy_ / seeded_dot against the materializing reference.
  info          backends available here.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time


def _time(fn, reps):
    import torch

    fn()  # warm-up (Triton compile, first-touch)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def bench_seeded(n: int, ks_list, device: str, reps: int) -> int:
    import torch

    import fwdkern
    from fwdkern.ops.reference import reference_seeded_axpy_, reference_seeded_dot

    backend = fwdkern.backends.resolve("seeded_axpy_", device)
    print(f"fwdkern {fwdkern.__version__} | torch {torch.__version__} | device {device} | backend {backend}")
    print(f"{'op':<13}{'n':>10}{'K':>6}{'fwdkern ms':>12}{'reference ms':>14}{'speedup':>9}{'max rel diff':>12}")
    for K in ks_list:
        p = torch.randn(n, device=device)
        ks = torch.arange(K, device=device) * 7 + 1
        c = torch.randn(K, device=device)
        for op in ("seeded_axpy_", "seeded_dot"):
            if op == "seeded_axpy_":
                a, r = p.clone(), p.clone()
                fwdkern.seeded_axpy_(a, 42, 3, ks, c, alpha=0.01)
                reference_seeded_axpy_(r, 42, 3, ks, c, alpha=0.01)
                diff = ((a - r).abs().max() / r.abs().max()).item()
                t_k = _time(lambda: fwdkern.seeded_axpy_(a, 42, 3, ks, c, alpha=0.0), reps)
                t_r = _time(lambda: reference_seeded_axpy_(r, 42, 3, ks, c, alpha=0.0), max(1, reps // 3))
            else:
                ref = reference_seeded_dot(p, 42, 3, ks)
                diff = ((fwdkern.seeded_dot(p, 42, 3, ks) - ref).abs().max() / ref.abs().max()).item()
                t_k = _time(lambda: fwdkern.seeded_dot(p, 42, 3, ks), reps)
                t_r = _time(lambda: reference_seeded_dot(p, 42, 3, ks), max(1, reps // 3))
            print(f"{op:<13}{n:>10}{K:>6}{t_k * 1e3:>12.2f}{t_r * 1e3:>14.1f}{t_r / t_k:>8.1f}x{diff:>12.2e}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fwdkern", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("bench-seeded", help="time the seeded ops against the materializing reference",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=1 << 20, help="elements")
    p.add_argument("--K", type=int, nargs="+", default=[1, 16, 64], help="perturbations per call")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions")
    sub.add_parser("info", help="versions and which backend runs on which device here")
    prof = sub.add_parser("profile", help="FwdLLM's PEFT profiler: which adapter to train with forward gradients",
                          description="Measures, for LoRA ranks/placements, IA3, BitFit and bottleneck adapters, "
                          "the trainable dimension, the forward-gradient estimate's cosine with the true gradient at "
                          "--perturbations, the client step's CPU time and peak memory, and recommends one.")
    for name in ("model", "data", "text_column", "label_column", "task", "max_length", "batch_size", "prompt_template",
                 "pooling"):
        _add_field(prof, name)
    prof.add_argument("--perturbations", type=int, default=16, help="K of the planned client step (default: 16)")
    prof.add_argument("--batches", type=int, default=2, help="training batches measured per candidate (default: 2)")
    prof.add_argument("--tangent-scope", choices=("batch", "sample"), default="batch",
                      help="each tangent's derivative is of the whole batch's loss (batch, default) or of one "
                      "sample's share of it (sample: the --perturbations tangents shared out among the batch's "
                      "samples, as a client with --tangent-scope sample computes them)")
    prof.add_argument("--out", default=None, help="write the report as JSON here (default: print only)")
    tr = sub.add_parser("train", help="federated forward-gradient fine-tuning (embedded simulation)",
                        description="Federated fine-tuning in one process (every client simulated here). Every "
                        "option left out is chosen by the default recipe (fwdkern.fl.recipe) from the model, the "
                        "data's size and the clients. Rerun the same command to resume; a larger --rounds extends "
                        "a finished run.")
    _add_run_args(tr, RUN_DEFAULTS_SHOWN)
    demo = sub.add_parser("demo", help="the bundled federated demos: classification (MiniLM + BBC News) or lm "
                          "(SmolLM2-135M adapting to a corpus)", formatter_class=argparse.RawDescriptionHelpFormatter,
                          description="`fwdkern train` with a demo's settings; every other option as in train.\n" +
                          "\n".join(f"  {name}: " + " ".join(f"--{k.replace('_', '-')} "
                                                             f"{' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                             for k, v in d.items()) for name, d in DEMOS.items()))
    demo.add_argument("which", nargs="?", default="classification", choices=list(DEMOS),
                      help="which demo (default: classification)")
    _add_run_args(demo, {}, suppress=True)
    gen = sub.add_parser("generate", help="continue a prompt with a causal-LM run's trained adapter (greedy)")
    gen.add_argument("--run", required=True, help="the run's folder (--out of fwdkern train / demo lm)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=48, help="tokens generated (default: 48)")
    args = ap.parse_args(argv)
    if args.cmd == "generate":
        return _guard(generate, args)
    if args.cmd in ("train", "demo"):
        return _guard(train, args)
    if args.cmd == "bench-seeded":
        return bench_seeded(args.n, args.K, args.device or ("cuda" if _cuda() else "cpu"), args.reps)
    if args.cmd == "info":
        return info()
    if args.cmd == "profile":
        return _guard(profile, args)
    return 2


def info() -> int:
    import platform

    import torch

    import fwdkern

    cuda = torch.cuda.is_available()
    print(f"fwdkern {fwdkern.__version__} | torch {torch.__version__} | python {platform.python_version()} | "
          f"CUDA device: {torch.cuda.get_device_name() if cuda else 'none'} | compiled extension: "
          f"{'yes' if fwdkern.backends.has_extension() else 'no'}")
    print(f"{'backend':<10} {'CPU tensors':<12} {'CUDA tensors'}")
    for b in fwdkern.backends.BACKENDS:
        on_cpu = "yes" if fwdkern.backends.available(b, "cpu") else "no"
        on_cuda = ("yes" if fwdkern.backends.available(b, "cuda") else "no") if cuda else "no (no CUDA device)"
        print(f"{b:<10} {on_cpu:<12} {on_cuda}")
    return 0


# The demos: the default recipe on bundled models and data; their settings only fix each run's size.
# classification: MiniLM on BBC News (bench/results/: the demo's committed run);
# lm: SmolLM2-135M adapting federatedly to a bundled corpus it did not see in this form.
DEMO_DEFAULTS = dict(model="all-minilm-l6-v2", data="bbc_news", rounds=20, max_length=64, max_test=445,
                     eval_every=5, target_modules=["layer.5.attention.self.query", "layer.5.attention.self.value"],
                     out="runs/demo")
# A few CPU minutes: 8 client rounds of 5 clients, one 4 x 48-token batch each (bench/results/demo_lm_cpu_*).
DEMO_LM_DEFAULTS = dict(model="smollm2-135m", data="guardian_headlines", task="causal_lm", clients=100,
                        clients_per_round=5, rounds=8, batch_size=4, local_batches=1, max_length=48, max_test=64,
                        eval_every=2, out="runs/demo_lm")
DEMOS = {"classification": DEMO_DEFAULTS, "lm": DEMO_LM_DEFAULTS}
RUN_DEFAULTS_SHOWN: dict = {}


def _add_run_args(p, overrides: dict, suppress: bool = False):
    """Every RunConfig field as an option (`suppress`: an option left out is absent from the namespace, so
    the caller fills it in from its own defaults -- a demo's settings, then train's)."""
    from .fl.config import fields_help

    for f, meta in fields_help():
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        shown = "auto" if default is None else (" ".join(map(str, default)) if isinstance(default, list) else default)
        text = meta.get("help", "")
        if "choices" in meta:
            text += f" [choices: {', '.join(map(str, meta['choices']))}]"
        if "(default:" not in text:
            text += f" (default: the demo's setting above, else {shown})" if suppress else f" (default: {shown})"
        text = text.replace("%", "%%")
        value = argparse.SUPPRESS if suppress else (None if meta.get("nargs") else f.default)
        if meta.get("nargs"):
            p.add_argument(flag, nargs=meta["nargs"], type=meta.get("type", str), default=value,
                           metavar="INDEX" if meta.get("type") is int else "NAME", help=text)
        elif isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", default=value, help=text)
        else:
            typ = meta.get("type") or (type(f.default) if f.default is not None else str)
            p.add_argument(flag, type=typ, default=value, metavar=f.name.upper(), help=text)


def _add_field(p, name):
    """One RunConfig option (help, default) on a parser other than train/demo."""
    from .fl.config import fields_help

    f, meta = next((f, m) for f, m in fields_help() if f.name == name)
    shown = "auto" if f.default is None else f.default
    p.add_argument("--" + name.replace("_", "-"), type=meta.get("type") or (type(f.default) if f.default is not None
                                                                           else str),
                   default=f.default, help=(meta.get("help", "") + f" (default: {shown})").replace("%", "%%"))


def profile(args) -> int:
    from .fl.config import RunConfig
    from .fl.profile import profile as run_profile, write

    kw = {k: getattr(args, k) for k in ("model", "data", "text_column", "label_column", "task", "max_length",
                                         "batch_size", "prompt_template", "pooling")}
    if isinstance(kw["label_column"], str) and kw["label_column"].lower() == "none":
        kw["label_column"] = None
    cfg = RunConfig(**kw, clients=max(args.batches, 2), clients_per_round=1).validate()
    report = run_profile(cfg, perturbations=args.perturbations, batches=args.batches,
                         tangent_scope=args.tangent_scope)
    print(f"recommended: {report['recommended']} ({report['rule']})")
    if args.out:
        write(report, args.out)
    return 0


def _guard(fn, args) -> int:
    """User mistakes end in one line naming the problem and exit code 2 (a failed run: 1; Ctrl-C:
    130), never a traceback; FWDKERN_DEBUG=1 shows the traceback."""
    import os

    from .fl.checkpoint import CorruptCheckpoint, RunLocked
    from .fl.simulation import Interrupted, RunFailed

    try:
        return fn(args)
    except KeyboardInterrupt:
        print("fwdkern: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"fwdkern: {e}", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"fwdkern: run failed: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, FileNotFoundError, RunLocked, CorruptCheckpoint, UnicodeError, ImportError,
            OSError) as e:
        if os.environ.get("FWDKERN_DEBUG") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fwdkern: error: {msg}", file=sys.stderr)
        return 2


def train(args) -> int:
    from .fl.config import RunConfig
    from .fl.simulation import build

    if args.cmd == "demo":  # RunConfig's defaults, then the demo's, then what was given
        kw = {**RunConfig().to_json(), **DEMOS[args.which],
              **{f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig) if hasattr(args, f.name)}}
    else:
        kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    if isinstance(kw["label_column"], str) and kw["label_column"].lower() == "none":
        kw["label_column"] = None
    cfg = RunConfig(**kw)
    sim = build(cfg)
    # The demo is a canned job: an earlier demo run with other settings (e.g. from an older
    # fwdkern) is replaced; `train` keeps refusing to mix configurations in one --out.
    summary = sim.run(replace_other_run=args.cmd == "demo")
    acc = summary["final"].get("accuracy")
    start = summary.get("initial", {}).get("accuracy")
    print(f"done: {summary['rounds']} steps ({summary['client_rounds']} client rounds)"
          + (f", test accuracy {start:.3f} -> {acc:.3f}" if acc is not None and start is not None else "")
          + f", {summary['cpu_time_s']:.0f} CPU s ({summary['wall_time_s']:.0f} s wall) training, "
          f"per client per round {summary['mean_bytes_up_per_client']:.0f} B up, "
          f"{summary['bytes_down_per_client'].get('mean', 0):.0f} B down (p95 "
          f"{summary['bytes_down_per_client'].get('p95', 0):.0f}) -> {cfg.out}")
    return 0


def generate(args) -> int:
    """Greedy continuation of --prompt by a causal-LM run's model (its base + the trained adapter)."""
    import os

    import torch

    from .fl.checkpoint import load_checkpoint
    from .fl.config import RunConfig
    from .engine import trainable
    from .fl.lm import encode_prompt
    from .fl.models import load_model, load_tokenizer, resolve_model_path
    from .fl.runstate import migrate
    from .fl.simulation import CHECKPOINT

    ckpt = os.path.join(args.run, CHECKPOINT)
    if not os.path.exists(ckpt):
        raise FileNotFoundError(f"--run {args.run}: no {CHECKPOINT} (not a fwdkern run folder, or the run has not "
                                "saved yet)")
    if not 1 <= args.max_new_tokens <= 4096:
        raise ValueError(f"--max-new-tokens: must be in [1, 4096], got {args.max_new_tokens}")
    state = migrate(load_checkpoint(ckpt), ckpt, log=lambda *a: None)
    cfg = RunConfig.from_json(state["config"])
    if cfg.task != "causal_lm" and not (cfg.task == "auto" and cfg.label_column is None):
        raise ValueError(f"--run {args.run}: a {cfg.task} run; generate continues text with a causal-LM run")
    path = resolve_model_path(cfg.model)
    tok = load_tokenizer(path)
    model, tok = load_model(cfg, None, "causal_lm", tok)
    weights = state["server"]["params"]
    with torch.no_grad():
        for n, _, p in trainable(model):
            p.copy_(weights[n])
    model.eval()
    if cfg.prompt_column is None:
        ids = tok(args.prompt, return_tensors="pt")["input_ids"]
    else:  # trained on prompt/response pairs: the prompt as it trained on them
        ids = torch.tensor([encode_prompt(tok, args.prompt, cfg.chat_template)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    print(args.prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
