"""The GPU check: the fast engine on a Llama-3.1-8B-shaped model, on whatever device is there.

One script that needs no registry, no hub and no Ray (nor scipy or scikit-learn): a
``LlamaForCausalLM`` with random weights at a named shape and Meta's Llama 3 tokenizer (a
directory made by :func:`tokmarg.synthetic.llama3_tokenizer_dir`), its lm_head scaled like the
test fixture, the repository's sample data and params. It measures, and prints as one JSON
object:

* ``fp32``: fast vs reference engine, all seven strategies, both semantics, float32 with TF32
  off: the largest score difference and whether every predicted code agrees;
* ``bf16_vs_fp32``: on the nodes both runs reached, how many nucleus cuts (top_p), eps prunings
  and EOS >= 0.7 decisions differ between bf16 and float32 weights;
* ``throughput``: bf16, all seven strategies, per batch size: samples/s and the seconds per
  sample in the model, in the device-side reduction and on the host, and the model calls by
  tokens per call (``forward_profile``); ``batch_speedup``: each batch size's samples/s against
  the first one's;
* ``attention``: the implementation the model had and the one the fast engine ran;
* ``multi_gpu``: with two or more GPUs, the model spread over two of them (accelerate), fast vs
  reference.

``python -m tokmarg.gpucheck --tokenizer DIR [--shape llama-3.1-8b] [--batches 8,32,64]
[--arch llama|llama4|mllama]`` (``llama4``: Llama Guard 4's text model at that shape, with the Llama 4
tokenizer's directory from :func:`tokmarg.synthetic.llama4_tokenizer_dir`); the test suite runs it
on a CPU with ``--shape tiny``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from tokmarg.bench import forward_profile
from tokmarg.config import build_config
from tokmarg.data import Sample, load_dataset
from tokmarg.engine.attention import NAME
from tokmarg.engine.scheduler import run_batch
from tokmarg.engine.score import EngineOptions, score
from tokmarg.engine.tree import TreeBackend, common_prefix_len, prepare
from tokmarg.models import LoadedModel, model_view
from tokmarg.nodestats import EXACT
from tokmarg.strategies import REGISTRY, Context, Query, SampleOutput
from tokmarg.synthetic import DEFAULT_LOGIT_STD, random_llama, random_multimodal
from tokmarg.worker import WorkerSpec, build_queries

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _queries(lm: LoadedModel, cfg, samples: list[Sample]) -> list[Query]:  # noqa: ANN001
    prompt = WorkerSpec.from_config(cfg.models[0], cfg).prompt(lm.tokenizer)
    return build_queries(prompt, cfg.taxonomy.labels, samples, False)


def _codes(out: SampleOutput, threshold: float) -> tuple:
    if out.scores is not None and out.ranked is None:
        return tuple(sorted(k for k, v in out.scores.items() if k != "unsafe" and v >= threshold))
    return out.pred_labels or out.ranked or ()


def _agreement(a: dict[str, list[SampleOutput]], b: dict[str, list[SampleOutput]], params: dict) -> dict:
    """Largest score difference and code agreement, per strategy and overall."""
    per = {}
    for s in a:
        diff, agree = 0.0, True
        for x, y in zip(a[s], b[s]):
            if (x.scores is None) != (y.scores is None):
                diff = math.inf
            elif x.scores is not None:
                diff = max(
                    [diff, *(abs(x.scores.get(k, 0.0) - y.scores.get(k, 0.0)) for k in set(x.scores) | set(y.scores))]
                )
            agree &= _codes(x, params[s].threshold) == _codes(y, params[s].threshold)
        per[s] = {"max_abs_diff": diff, "codes_agree": agree}
    return {
        "max_abs_diff": max(p["max_abs_diff"] for p in per.values()),
        "codes_agree": all(p["codes_agree"] for p in per.values()),
        "within_tolerance": all(p["max_abs_diff"] <= TOL for p in per.values()),
        "per_strategy": per,
    }


def _recorded(lm: LoadedModel, info, tokens, queries: list[Query], cfg, semantics: str) -> dict:  # noqa: ANN001
    """Every node summary of a fast-engine run (one batch), by (sample, path)."""
    mc = cfg.models[0]
    p = common_prefix_len([q.prompt_ids for q in queries])
    backend = TreeBackend(lm.model, lm.device, queries[0].prompt_ids[:p], 4096, name=lm.name)
    backend.record = {}
    rows = [[(s, Context(None, info, tokens, q, mc.params[s], semantics)) for s in REGISTRY] for q in queries]
    run_batch(backend, rows)
    return backend.record


def _flips(a: dict, b: dict, info, sp) -> dict:  # noqa: ANN001
    """Tree decisions that differ between two runs on the nodes both reached (`exact` nuclei)."""
    key = (EXACT, sp.top_p)
    eos = set(info.eos_ids)

    def path_prob(rec: dict, node) -> float:  # noqa: ANN001
        i, path = node
        c = 1.0
        for d in range(len(path)):
            st = rec.get((i, path[:d]))
            probs = dict(zip(st.top_ids.tolist(), st.top_probs.tolist())) if st is not None else {}
            c *= probs.get(path[d], 0.0)
        return c

    out = {"nodes_common": 0, "top_p": 0, "eps": 0, "eos_0.7": 0}
    for node in set(a) & set(b):
        x, y = a[node], b[node]
        if key not in x.nucleus or key not in y.nucleus:
            continue
        out["nodes_common"] += 1
        out["top_p"] += x.nucleus[key] != y.nucleus[key]
        cx, cy = path_prob(a, node), path_prob(b, node)
        px = dict(zip(*(v.tolist() for v in x.nucleus_of(*key)[:2])))
        py = dict(zip(*(v.tolist() for v in y.nucleus_of(*key)[:2])))
        for t in set(px) & set(py):
            out["eps"] += (cx * px[t] >= sp.eps) != (cy * py[t] >= sp.eps)
            if t in eos:
                out["eos_0.7"] += (px[t] >= 0.7) != (py[t] >= 0.7)
    out["nodes_only_in_one"] = len(set(a) ^ set(b))
    return out


def _throughput(lm: LoadedModel, info, tokens, cfg, samples: list[Sample], batch: int, n: int) -> dict:  # noqa: ANN001
    rows = [replace(samples[i % len(samples)], id=f"{samples[i % len(samples)].id}#{i}") for i in range(n)]
    queries = _queries(lm, cfg, rows)
    mc = cfg.models[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, st = score(lm, info, tokens, queries, list(REGISTRY), mc.params, "exact", EngineOptions("fast", batch, 0))
    total = time.perf_counter() - t0
    return {
        "batch": batch,
        "samples": n,
        "samples_per_s": n / total,
        "model_seconds_per_sample": st.model_seconds / n,
        "reduce_seconds_per_sample": st.reduce_seconds / n,
        "host_seconds_per_sample": (total - st.model_seconds) / n,  # reduce_seconds included
        "nodes_per_sample": st.nodes / n,
        "bytes_to_host_per_node": st.bytes_to_host / max(st.nodes, 1),
        "forward_calls": st.forward_calls,
        "forward_profile": forward_profile(st.calls),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def _multi_gpu(model: torch.nn.Module, tok, info, tokens, cfg, samples: list[Sample]) -> dict:  # noqa: ANN001
    """The model split over GPUs 0 and 1 by accelerate: fast vs reference on two samples."""
    from accelerate import dispatch_model, infer_auto_device_map

    per_gpu = sum(p.numel() * p.element_size() for p in model.parameters()) * 0.6
    dmap = infer_auto_device_map(model, max_memory={0: int(per_gpu), 1: int(per_gpu) * 2})
    spread = dispatch_model(model, device_map=dmap)
    lm = LoadedModel("spread", spread, tok, spread.get_input_embeddings().weight.device, spread.dtype)
    queries = _queries(lm, cfg, samples[:2])
    mc = cfg.models[0]
    ref, _ = score(lm, info, tokens, queries, list(REGISTRY), mc.params, "exact", EngineOptions("reference"))
    fast, _ = score(lm, info, tokens, queries, list(REGISTRY), mc.params, "exact", EngineOptions("fast"))
    devices = sorted({str(d) for d in dmap.values()})
    return {"devices": devices, **_agreement(fast, ref, mc.params)}


def run(
    tokenizer_dir: Path, shape: str, batches: list[int], samples: int, logit_std: float, arch: str = "llama"
) -> dict:
    from transformers import AutoTokenizer

    t_start = time.perf_counter()
    dev = "cuda:0" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = build_config(ROOT / "params.yaml", None, None, None, dev, "fp32")
    data = load_dataset(ROOT / "datasets" / "sample.jsonl", cfg.taxonomy).samples
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if arch == "llama":
        model = random_llama(tok, shape, logit_std, device=dev)
    else:  # Llama Guard 4's or 3 11B-Vision's text model, as AutoModelForCausalLM loads it
        model = random_multimodal(arch, tok, shape, logit_std, text_only=True, device=dev)
    result: dict = {
        "arch": type(model).__name__,
        "device": torch.cuda.get_device_name(0) if dev != "cpu" else "cpu",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "shape": shape,
        "parameters_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "build_seconds": time.perf_counter() - t_start,
    }
    lm = LoadedModel(shape, model, tok, torch.device(dev), torch.float32)
    info, tokens = model_view(lm, cfg.taxonomy.codes)
    previous = prepare(model, shape)
    result["attention"] = {
        "model_had": previous,
        "fast_engine": f"{NAME}: prefix in one matmul per forward, own tokens per sample, merged by log-sum-exp",
        "now": model.config._attn_implementation,
        "reference_engine": "sdpa",
    }
    if dev != "cpu":
        result["attention"]["sdpa_backends"] = {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
        }
    mc = cfg.models[0]
    queries = _queries(lm, cfg, data[:samples])
    result["fp32"] = {}
    for sem in ("exact", "paper"):
        ref, _ = score(lm, info, tokens, queries, list(REGISTRY), mc.params, sem, EngineOptions("reference"))
        fast, _ = score(lm, info, tokens, queries, list(REGISTRY), mc.params, sem, EngineOptions("fast"))
        result["fp32"][sem] = _agreement(fast, ref, mc.params)
    rec32 = _recorded(lm, info, tokens, queries, cfg, "exact")
    model.to(torch.bfloat16)
    lm = replace(lm, dtype=torch.bfloat16)
    rec16 = _recorded(lm, info, tokens, queries, cfg, "exact")
    result["bf16_vs_fp32"] = _flips(rec32, rec16, info, mc.params["marginal_probability_at_any_place"])
    result["throughput"] = [_throughput(lm, info, tokens, cfg, data, b, 2 * b) for b in batches]
    base = result["throughput"][0]  # each batch size's samples/s against the first's (8 by default)
    result["batch_speedup"] = {
        str(t["batch"]): t["samples_per_s"] / base["samples_per_s"] for t in result["throughput"]
    }
    result["multi_gpu"] = _multi_gpu(model, tok, info, tokens, cfg, data) if result["gpus"] >= 2 else None
    result["seconds"] = time.perf_counter() - t_start
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tokmarg.gpucheck", description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="the converted Llama 3 tokenizer directory")
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument(
        "--arch",
        default="llama",
        choices=["llama", "llama4", "mllama"],
        help="llama4: Llama Guard 4's text model (give the Llama 4 tokenizer); mllama: Llama Guard 3 11B-Vision's",
    )
    ap.add_argument(
        "--batches", default="8,32,64", help="batch sizes to time; the first is the baseline of batch_speedup"
    )
    ap.add_argument("--samples", type=int, default=4, help="samples for the fp32 agreement and the bf16 flips")
    ap.add_argument("--logit-std", type=float, default=DEFAULT_LOGIT_STD)
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    res = run(args.tokenizer, args.shape, batches, args.samples, args.logit_std, args.arch)
    text = json.dumps(res)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
