"""Long-context experiment (docs/long_context.md): passkey and perplexity by length over RoPE scalings.

  python experiments/long_context.py smollm2   # (a) SmolLM2-135M-Instruct, simulated short original context
  python experiments/long_context.py scratch   # (b) llama-20m trained at L=128 (pretrain_short), before and
                                               #     after a YaRN s=4 fine-tune at 512 (pretrain_extend)
  python experiments/long_context.py redo      # the steps rerun after two fixes found mid-run (see the doc)
  python experiments/long_context.py control   # (b) again with controls: stage 1 (if its model is absent), the
                                               #     YaRN fine-tune and the same fine-tune unscaled (and linear s=4),
                                               #     every model evaluated with the same commands
  python experiments/long_context.py span      # the base model and each arm over 4x more text (16 x 1024 tokens),
                                               #     at 128..1024 (1024: past every fine-tune's length)
  python experiments/long_context.py paired    # per-window NLL on that span, each arm minus the control, with
                                               #     the standard error of the paired differences (in process)
  python experiments/long_context.py merge     # combined tables and plots from the steps' table.csv files

Every step is an `ankus` command run as a subprocess; its wall time goes to timings_<part>.json and its
output to <step>.log, all under runs/experiments/long_context/. Part (b) waits for
runs/pretrain_short/model (stage 1: `ankus train pretrain_short`).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("runs/experiments/long_context")
ANKUS = [sys.executable, "-m", "ankus.cli"]
SCALINGS = "none,linear,dynamic-ntk,yarn,dynamic-yarn"


def step(name: str, args: list[str], timings: dict, part: str) -> None:
    t0 = time.perf_counter()
    with open(OUT / f"{name}.log", "w") as log:
        rc = subprocess.call(ANKUS + args, stdout=log, stderr=subprocess.STDOUT)
    timings[name] = {"command": "ankus " + " ".join(args), "wall_s": round(time.perf_counter() - t0, 1), "rc": rc}
    (OUT / f"timings_{part}.json").write_text(json.dumps(timings, indent=1))
    if rc:
        raise SystemExit(f"{name} failed (rc {rc}); see {OUT / (name + '.log')}")


def read(path: Path, label: str) -> list[dict]:
    rows = list(csv.DictReader(open(path)))
    for r in rows:
        r["series"] = f"{label}{r['method']}"
        r["length"] = int(r["length"])
        for k in ("pass_rate", "ppl", "nll", "key_logp"):
            if k in r:
                r[k] = float(r[k])
    return rows


def smollm2() -> None:
    t: dict = {}
    common = ["--model", "smollm2-135m-instruct", "--scalings", SCALINGS, "--factor", "4", "--original-max", "512"]
    step("smollm2_passkey", ["eval", "passkey", *common, "--lengths", "512,2048", "--trials", "20",
                             "--out", str(OUT / "smollm2_passkey")], t, "smollm2")
    step("smollm2_ppl", ["eval", "perplexity-by-length", *common, "--lengths", "512,1024,2048", "--windows", "4",
                         "--out", str(OUT / "smollm2_ppl")], t, "smollm2")


def scratch() -> None:
    t: dict = {}
    base, ext = Path("runs/pretrain_short/model"), Path("runs/pretrain_extend/model")
    while not (base / "config.json").exists():
        time.sleep(20)
    common = ["--scalings", SCALINGS, "--factor", "4", "--original-max", "128"]
    ppl = ["--lengths", "128,256,512", "--corpus", "runs/corpora/stdlib", "--heldout", "0.02", "--windows", "8"]
    pk = ["--lengths", "128,256,512", "--trials", "20"]
    before(t, "scratch", base, common, ppl, pk)
    step("stage2_extend", ["train", "pretrain_extend", f"model.spec={base}", "run.progress=false"], t, "scratch")
    # the extended model carries YaRN s=4 in its config.json: evaluated as saved ("none" adds nothing)
    step("scratch_after_ppl", ["eval", "perplexity-by-length", "--model", str(ext), "--scalings", "none",
                               "--original-max", "512", *ppl, "--out", str(OUT / "scratch_after_ppl")], t, "scratch")
    step("scratch_after_passkey", ["eval", "passkey", "--model", str(ext), "--scalings", "none",
                                   "--original-max", "512", *pk, "--out", str(OUT / "scratch_after_passkey")], t, "scratch")
    merge()


BASE = Path("runs/pretrain_short/model")
COMMON = ["--scalings", SCALINGS, "--factor", "4", "--original-max", "128"]
PPL = ["--lengths", "128,256,512", "--corpus", "runs/corpora/stdlib", "--heldout", "0.02", "--windows", "8"]
PK = ["--lengths", "128,256,512", "--trials", "20"]


def before(t: dict, part: str, base: Path = BASE, common=COMMON, ppl=PPL, pk=PK) -> None:
    step("scratch_before_ppl", ["eval", "perplexity-by-length", "--model", str(base), *common, *ppl,
                                "--out", str(OUT / "scratch_before_ppl")], t, part)
    step("scratch_before_passkey", ["eval", "passkey", "--model", str(base), *common, *pk,
                                    "--out", str(OUT / "scratch_before_passkey")], t, part)


def redo() -> None:
    """After the dynamic-NTK fix (scale_rope had left it a no-op up to the extended length) and the
    perplexity fix (every length over the same text): the runs that had used the old code."""
    t: dict = {}
    before(t, "redo")
    step("smollm2_passkey_dynamic_ntk", ["eval", "passkey", "--model", "smollm2-135m-instruct", "--scalings",
                                         "dynamic-ntk", "--factor", "4", "--original-max", "512", "--lengths",
                                         "512,2048", "--trials", "20", "--out", str(OUT / "smollm2_passkey_dynamic_ntk")],
         t, "redo")


# stage 2 arms: pretrain_extend's fine-tune (same steps, lr, data, seed) with only the RoPE scaling changed
ARMS = {
    "yarn": ["run.name=pretrain_extend"],
    "control": ["rope.method=none", "rope.factor=1.0", "rope.original_max=0", "run.name=pretrain_extend_control"],
    "linear": ["rope.method=linear", "run.name=pretrain_extend_linear"],
}


def arm(t: dict, name: str) -> None:
    """Fine-tune one stage 2 arm, then evaluate it as saved (its scaling, if any, is in its config.json)."""
    model = Path("runs") / ARMS[name][-1].split("=", 1)[1] / "model"
    step(f"stage2_{name}", ["train", "pretrain_extend", f"model.spec={BASE}", *ARMS[name], "run.progress=false"],
         t, "control")
    for kind, args in (("ppl", ["eval", "perplexity-by-length", *PPL]), ("passkey", ["eval", "passkey", *PK])):
        out = OUT / f"control_{name}_{kind}"
        step(out.name, [*args, "--model", str(model), "--scalings", "none", "--original-max", "512", "--out", str(out)],
             t, "control")


def control() -> None:
    """Part (b) with its controls; docs/long_context.md reads timings_control.json and the control_* tables."""
    t: dict = {}
    if not (BASE / "config.json").exists():
        step("stage1_short", ["train", "pretrain_short", "run.progress=false"], t, "control")
    before(t, "control")
    for name in sys.argv[2:] or ("yarn", "control", "linear"):
        arm(t, name)
    merge_control()


def span() -> None:
    """Perplexity of the unscaled base model and of each fine-tuned arm (as saved) over 16 x 1024 held-out tokens
    (twice the 8 x 512 of the tables above), the same span at every length; 1024 extrapolates past 512."""
    t: dict = {}
    models = {"base": BASE, **{name: Path("runs") / a[-1].split("=", 1)[1] / "model" for name, a in ARMS.items()}}
    for name, model in models.items():
        out = OUT / f"span_{name}_ppl"
        step(out.name, ["eval", "perplexity-by-length", "--model", str(model), "--scalings", "none", "--original-max",
                        "512", "--lengths", "128,256,512,1024", "--corpus", "runs/corpora/stdlib", "--heldout", "0.02",
                        "--windows", "16", "--out", str(out)], t, "span")


def paired() -> None:
    """Per-window mean NLL of every model on span()'s text (windows of 512 and 1024), and each model minus
    the unscaled control: mean difference and its standard error over the windows (paired_<n>.csv)."""
    import numpy as np
    import torch

    from ankus.data.corpus import load_corpus
    from ankus.models.loading import load_model
    from ankus.trainers.pretrain import split_documents

    t0 = time.perf_counter()
    corpus = load_corpus("runs/corpora/stdlib")
    held = split_documents(len(corpus.documents), 0.02, 0)[1]
    tokens = np.concatenate([corpus.documents[i] for i in held])[:16 * 1024]  # (16384,)
    models = {"base": BASE, **{name: Path("runs") / a[-1].split("=", 1)[1] / "model" for name, a in ARMS.items()}}
    nll: dict[tuple[str, int], np.ndarray] = {}
    for name, path in models.items():
        model = load_model(str(path))[0].eval()
        for n in (512, 1024):
            ids = torch.as_tensor(tokens.reshape(-1, n), dtype=torch.long)  # (W, n)
            with torch.no_grad():
                nll[name, n] = np.array([torch.nn.functional.cross_entropy(
                    model(input_ids=row[None]).logits[0, :-1].float(), row[1:]).item() for row in ids])  # (W,)
    for n in (512, 1024):
        rows = []
        for name in models:
            d = nll[name, n] - nll["control", n]  # (W,)
            rows.append({"model": name, "length": n, "windows": len(d), "nll": round(float(nll[name, n].mean()), 4),
                         "minus_control": round(float(d.mean()), 4),
                         "stderr": round(float(d.std(ddof=1) / np.sqrt(len(d))), 4),
                         "windows_below_control": int((d < 0).sum())})
        with open(OUT / f"paired_{n}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(*(", ".join(f"{k}={v}" for k, v in r.items()) for r in rows), sep="\n")
    print(f"paired: {time.perf_counter() - t0:.1f} s")


def merge_control() -> None:
    from ankus.evals.long_context import plot_by_length, write_table

    labels = {"yarn": "yarn s=4 fine-tuned", "control": "no scaling fine-tuned (control)",
              "linear": "linear s=4 fine-tuned"}
    for kind, y, label in (("ppl", "ppl", "perplexity"), ("passkey", "pass_rate", "passkey pass rate")):
        rows = read(OUT / f"scratch_before_{kind}" / "table.csv", "base: ")
        for name, series in labels.items():
            path = OUT / f"control_{name}_{kind}" / "table.csv"
            if path.exists():
                rows += [{**r, "series": f"after: {series}"} for r in read(path, "")]
        write_table(rows, OUT / f"control_{kind}.csv")
        plot_by_length(rows, y, OUT / f"control_{kind}.png", f"llama-20m trained at 128, fine-tuned at 512: {label}",
                       label, series="series")


def merge() -> None:
    from ankus.evals.long_context import plot_by_length, write_table

    for kind, y, label in (("ppl", "ppl", "perplexity"), ("passkey", "pass_rate", "passkey pass rate")):
        rows = read(OUT / f"scratch_before_{kind}" / "table.csv", "before: ")
        rows += [{**r, "series": "after: yarn s=4 fine-tuned"} for r in read(OUT / f"scratch_after_{kind}" / "table.csv", "")]
        write_table(rows, OUT / f"scratch_{kind}.csv")
        plot_by_length(rows, y, OUT / f"scratch_{kind}.png", f"llama-20m trained at 128: {label}", label, series="series")
    fixed = OUT / "smollm2_passkey_dynamic_ntk" / "table.csv"
    if (OUT / "smollm2_passkey" / "table.csv").exists() and fixed.exists():
        rows = [r for r in read(OUT / "smollm2_passkey" / "table.csv", "") if r["method"] != "dynamic-ntk"]
        rows += read(fixed, "")
        write_table(rows, OUT / "smollm2_passkey.csv")
        plot_by_length(rows, "pass_rate", OUT / "smollm2_passkey.png", "SmolLM2-135M, simulated original 512: passkey",
                       "passkey pass rate", series="series")
    if (OUT / "smollm2_ppl" / "table.csv").exists():
        rows = read(OUT / "smollm2_ppl" / "table.csv", "")
        write_table(rows, OUT / "smollm2_ppl.csv")
        plot_by_length(rows, "ppl", OUT / "smollm2_ppl.png", "SmolLM2-135M, simulated original 512: perplexity",
                       "perplexity", series="series")


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    {"smollm2": smollm2, "scratch": scratch, "redo": redo, "merge": merge, "control": control,
     "merge_control": merge_control, "span": span,
     "paired": paired}[sys.argv[1]]()
