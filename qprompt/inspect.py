"""What a trained soft prompt holds, in words and numbers: the logic of `qprompt inspect ARTIFACT`.

Soft prompts are opaque: a virtual token is a vector, not a word. This module reads one virtual token
at a time, in three ways, and returns plain dicts (JSON-ready) that the CLI prints, draws and saves:

- nearest tokens (prompt tuning, p-tuning): the vocabulary tokens whose input embeddings point the
  most the same way (cosine similarity), taken from the prompt as the model sees it, i.e. after
  p-tuning's encoder. A prompt started from text and not yet trained shows that text's tokens.
- norm: a virtual token's L2 norm next to the vocabulary's typical norm (the median row norm of the
  input embedding matrix). A trained prompt often drifts far from the norms of real tokens.
- importance: the validation metric with that one virtual token dropped, minus the full prompt's
  metric (negative: the prompt needs the token; about 0: it does little). Dropping a token hides it
  from attention (`forward.masked_virtual_tokens`), so each virtual token costs one evaluation.

Prefix tuning learns keys and values for every layer instead of embeddings, so there is nothing to
compare with the vocabulary: `prefix_norms` gives the mean L2 norm of each virtual token's keys and
values per layer (a layers x virtual-tokens grid), and importance works as above, a dropped slot being
hidden from every layer. Per-layer importance (one layer's whole prefix hidden) is not measured: the
attention mask is shared by all layers, so hiding a prefix from one layer only would need a hook in
every attention module, not the one mask edit the forward pass has.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import RecipeConfig
from .evaluate import evaluate, main_metric
from .forward import base_of, is_prefix, masked_virtual_tokens, soft_prompt, virtual_tokens
from .methods import get_method

# Vocabulary rows compared with the prompt at a time: bounds the memory of the cosine matrix for large
# vocabularies (150k rows x 4k dims would be 2.4 GB in float32 at once).
VOCAB_CHUNK = 16384


# ------------------------------------------------------------------------------- embedding methods
@torch.no_grad()
def prompt_embeddings(model) -> torch.Tensor:
    """The virtual token embeddings (n, hidden) the decoder reads: after p-tuning's MLP/LSTM encoder."""
    return soft_prompt(model, 1)[0].float()


@torch.no_grad()
def nearest_tokens(model, tokenizer, top: int = 3) -> dict:
    """Per virtual token: the `top` vocabulary tokens by cosine similarity, its norm, and the typical norm.

    Only the rows the tokenizer can produce are compared: a model's embedding matrix is often padded
    past the vocabulary with rows no text ever reads.
    """
    prompt = prompt_embeddings(model)
    table = base_of(model).get_input_embeddings().weight
    vocab = min(table.shape[0], len(tokenizer))
    top = min(top, vocab)
    unit = F.normalize(prompt.to(table.device), dim=-1)
    best_cos = unit.new_full((len(prompt), top), -math.inf)
    best_ids = torch.zeros((len(prompt), top), dtype=torch.long, device=table.device)
    row_norms = []
    for start in range(0, vocab, VOCAB_CHUNK):  # a running top-k over chunks of the vocabulary
        rows = table[start : min(start + VOCAB_CHUNK, vocab)].float()
        row_norms.append(rows.norm(dim=-1))
        cos = unit @ F.normalize(rows, dim=-1).T
        ids = torch.arange(start, start + len(rows), device=table.device).expand(len(prompt), -1)
        best_cos, picked = torch.cat([best_cos, cos], dim=1).topk(top, dim=1)
        best_ids = torch.cat([best_ids, ids], dim=1).gather(1, picked)
    typical = float(torch.cat(row_norms).median())
    norms = prompt.norm(dim=-1).tolist()
    tokens = []
    for i, (ids, cosines) in enumerate(zip(best_ids.tolist(), best_cos.tolist())):
        nearest = [{"id": t, "token": token_text(tokenizer, t), "cosine": c} for t, c in zip(ids, cosines)]
        tokens.append({"index": i, "nearest": nearest, "norm": norms[i], "norm_ratio": norms[i] / typical})
    return {"typical_norm": typical, "vocabulary_rows": vocab, "tokens": tokens}


def token_text(tokenizer, token_id: int) -> str:
    """A token as text; a byte-level token that is only part of a character decodes to U+FFFD, which would make
    different tokens look alike, so those show as their vocabulary entry instead."""
    text = tokenizer.decode([token_id])
    return tokenizer.convert_ids_to_tokens(token_id) if "\ufffd" in text else text


# ---------------------------------------------------------------------------------- prefix tuning
@torch.no_grad()
def prefix_norms(model) -> dict:
    """Prefix tuning's keys and values: their mean L2 norm per layer and virtual token (layers x tokens).

    A virtual token's key at one layer is one vector per key/value head; attention reads each head
    apart, so the norm is taken per head and averaged over the heads.
    """
    layers = soft_prompt(model, 1).layers  # each: keys and values (1, kv_heads, n, head_dim)
    keys = [layer.keys[0].float().norm(dim=-1).mean(dim=0).tolist() for layer in layers]
    values = [layer.values[0].float().norm(dim=-1).mean(dim=0).tolist() for layer in layers]
    tokens = [{"index": i, "key_norm": sum(k[i] for k in keys) / len(keys),
               "value_norm": sum(v[i] for v in values) / len(values)} for i in range(len(keys[0]))]
    return {"layers": len(layers), "key_norms": keys, "value_norms": values, "tokens": tokens}


# ------------------------------------------------------------------------------------- importance
def importance(model, tokenizer, recipe: RecipeConfig, rows: list[dict], where: str = "validation rows",
               batch_size: int = 32) -> dict:
    """The recipe's main metric on `rows` with the full prompt, then with each virtual token dropped alone.

    One evaluation per virtual token, plus one: the cost of `qprompt inspect` unless --no-importance.
    `importance[i]` is dropped[i] - full, so a negative value means the prompt does worse without token i.
    """
    metric = main_metric(recipe)
    full = float(evaluate(model, tokenizer, recipe, rows, where, batch_size=batch_size)[metric])
    dropped = []
    for slot in range(virtual_tokens(model)):
        with masked_virtual_tokens(model, [slot]):
            dropped.append(float(evaluate(model, tokenizer, recipe, rows, where, batch_size=batch_size)[metric]))
    return {"metric": metric, "rows": len(rows), "full": full, "dropped": dropped,
            "importance": [d - full for d in dropped]}


# ------------------------------------------------------------------------------------- the report
def inspect_prompt(model, tokenizer, recipe: RecipeConfig, rows: list[dict] | None = None, top: int = 3,
                   where: str = "validation rows", batch_size: int = 32) -> dict:
    """Everything `qprompt inspect` shows, as one JSON-ready dict; no importance when `rows` is None.

    `tokens` has one entry per virtual token; the per-method parts sit under `embedding` or `prefix`.
    """
    model.eval()  # p-tuning's encoder may hold dropout: the prompt must be the one the model scores with
    report = {"method": recipe.method.name, "exports_as": get_method(recipe.method.name).exports_as,
              "virtual_tokens": virtual_tokens(model), "embedding": None, "prefix": None, "importance": None}
    if is_prefix(model):
        report["prefix"] = prefix_norms(model)
        tokens = report["prefix"].pop("tokens")
    else:
        report["embedding"] = nearest_tokens(model, tokenizer, top)
        tokens = report["embedding"].pop("tokens")
    if rows is not None:
        report["importance"] = importance(model, tokenizer, recipe, rows, where, batch_size)
    for token in tokens:
        token["importance"] = report["importance"]["importance"][token["index"]] if rows is not None else None
    report["tokens"] = tokens
    return report


def format_table(report: dict) -> list[str]:
    """The report as text lines: a header, then one line per virtual token."""
    imp = report["importance"]
    lines = [f"{report['method']}: {report['virtual_tokens']} virtual tokens"]
    if imp:
        lines.append(f"full prompt: {imp['metric']} {imp['full']:.4f} on {imp['rows']} rows; importance = "
                     f"{imp['metric']} with the token dropped - full (negative: the prompt needs it)")
    shown_importance = (lambda t: f"{t['importance']:+.4f}") if imp else (lambda t: "-")
    if report["embedding"]:
        typical = report["embedding"]["typical_norm"]
        lines.append(f"norm: the token's L2 norm / the vocabulary's median row norm ({typical:.3f})")
        lines.append(f"{'#':>3}  {'nearest vocabulary tokens (cosine)':<56} {'norm':>7} {'ratio':>6} "
                     f"{'importance':>10}")
        for t in report["tokens"]:
            near = "  ".join(f"{n['token']!r} {n['cosine']:.2f}" for n in t["nearest"])
            lines.append(f"{t['index']:>3}  {near:<56} {t['norm']:>7.3f} {t['norm_ratio']:>6.2f} "
                         f"{shown_importance(t):>10}")
    else:
        p = report["prefix"]
        lines.append(f"norms: mean L2 norm of the token's keys and values over the key/value heads, "
                     f"averaged over the {p['layers']} layers (lowest-highest layer in brackets); "
                     "per-layer importance is not measured")
        lines.append(f"{'#':>3}  {'key norm':<24} {'value norm':<24} {'importance':>10}")
        for t in report["tokens"]:
            i = t["index"]
            keys, values = [row[i] for row in p["key_norms"]], [row[i] for row in p["value_norms"]]
            key = f"{t['key_norm']:.3f} ({min(keys):.2f}-{max(keys):.2f})"
            value = f"{t['value_norm']:.3f} ({min(values):.2f}-{max(values):.2f})"
            lines.append(f"{i:>3}  {key:<24} {value:<24} {shown_importance(t):>10}")
    return lines


def draw_png(report: dict, path: str | Path) -> None:
    """A heat map of the report: per virtual token, [top-1 cosine, norm ratio, importance] for embedding
    methods; the layers x tokens key and value norms with the importance beneath for prefix tuning."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display, no global pyplot state
    from matplotlib.figure import Figure

    tokens, imp = report["tokens"], report["importance"]
    n = len(tokens)
    annotate = n <= 40  # numbers in the cells while they fit
    if report["embedding"]:
        columns = [("top-1 cosine", [t["nearest"][0]["cosine"] for t in tokens], "viridis", (0, 1)),
                   ("norm / typical", [t["norm_ratio"] for t in tokens], "magma", (0, None))]
        if imp:
            bound = max(abs(v) for v in imp["importance"]) or 1.0  # all zero: a plain scale, not one of 1e-9
            columns.append((f"importance\n(Δ {imp['metric']})", imp["importance"], "RdBu", (-bound, bound)))
        fig = Figure(figsize=(2.2 * len(columns) + 2.5, max(3.0, 0.28 * n + 1.5)), layout="constrained")
        axes = fig.subplots(1, len(columns), sharey=True)
        for ax, (title, values, cmap, (lo, hi)) in zip(axes, columns):
            image = ax.imshow([[v] for v in values], aspect="auto", cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            fig.colorbar(image, ax=ax, fraction=0.08)
            if annotate:
                for row, v in enumerate(values):
                    ax.text(0, row, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            bbox={"facecolor": "white", "alpha": 0.6, "linewidth": 0, "pad": 1})
        axes[0].set_yticks(range(n), [f"{t['index']} {t['nearest'][0]['token']!r}" for t in tokens], fontsize=7)
        axes[0].set_ylabel("virtual token and its nearest vocabulary token")
    else:
        p = report["prefix"]
        grids = [("key norms", p["key_norms"]), ("value norms", p["value_norms"])]
        heights = [max(1, p["layers"])] * 2 + ([1] if imp else [])
        fig = Figure(figsize=(max(5.0, 0.35 * n + 2.5), 1.5 + 0.3 * sum(heights) + 1.2 * len(heights)),
                     layout="constrained")
        axes = fig.subplots(len(heights), 1, sharex=True, gridspec_kw={"height_ratios": heights})
        for ax, (title, grid) in zip(axes, grids):
            image = ax.imshow(grid, aspect="auto", cmap="magma")
            ax.set_title(f"{title} (mean L2 over key/value heads)", fontsize=9)
            ax.set_ylabel("layer")
            ax.set_yticks(range(p["layers"]))
            fig.colorbar(image, ax=ax, fraction=0.04)
        if imp:
            bound = max(abs(v) for v in imp["importance"]) or 1.0
            image = axes[2].imshow([imp["importance"]], aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound)
            axes[2].set_title(f"importance: {imp['metric']} with the token dropped - full", fontsize=9)
            axes[2].set_yticks([])
            fig.colorbar(image, ax=axes[2], fraction=0.04)
            if annotate:
                for col, v in enumerate(imp["importance"]):
                    axes[2].text(col, 0, f"{v:+.2f}", ha="center", va="center", fontsize=7)
        axes[-1].set_xticks(range(n))
        axes[-1].set_xlabel("virtual token")
    fig.suptitle(f"{report['method']}: {n} virtual tokens", fontsize=10)
    FigureCanvasAgg(fig).print_png(str(path))
