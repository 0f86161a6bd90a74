"""Run an exported soft-prompt graph with ONNX Runtime: no torch, no transformers, no PEFT.

Needs only onnxruntime, numpy and tokenizers. The soft prompt is inside the graph as a constant
KV prefix, so callers pass plain token ids; this module adds the recipe's template, batching, a KV
cache for generation, and classification by label log-likelihood. It drives both kinds of graph
(qprompt-export.json's `graph`): a fused graph keeps its cache in one buffer per layer, bound as both
past and present and written in place, with right-padded batches; a written-out graph returns a longer
cache each call, with left-padded batches.

    from qprompt.deploy.runtime import ExportedModel
    m = ExportedModel("export/")
    m.generate(["a warm, funny film"], max_new_tokens=8)
    m.classify([{"text": "a warm, funny film"}])          # -> ["positive"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExportError
from .manifest import EXPORT_MANIFEST, ExportManifest, TaskEntry, read_json

# none: fp32 only. int8: weight-only, 8-bit blocks of 32 (MatMulNBits). int8-dynamic: int8 weights and
# activations quantized per call (ORT's quantize_dynamic). int4: weight-only, 4-bit blocks of 32.
# nf4/fp4: bitsandbytes' 4-bit formats (MatMulBnb4, blocks of 64), made from the bitsandbytes-quantized
# base itself, so the graph holds the very weights an nf4/fp4-trained prompt was trained against.
QUANTIZATIONS = ("none", "int8", "int8-dynamic", "int4", "nf4", "fp4")


@dataclass
class Sampling:
    """Decoding settings: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.

    top_p keeps the most likely tokens whose probabilities sum to top_p, and always the most likely one:
    top_p 0 keeps only that token (greedy, whatever the temperature)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Continuation:
    """One prompt being continued: its sampling, the tokens so far and how much of their text was handed out.

    The one decoding rule of qprompt's runtime and of `qprompt serve`: `advance` picks the next token from the
    logits and says the new text and whether the continuation ended (EOS, a stop string, max_new_tokens)."""

    sampling: Sampling
    rng: np.random.Generator
    out: list[int] = field(default_factory=list)
    text: str = ""  # the output so far, cut before a stop string
    sent: int = 0  # characters of `text` already handed out
    reason: str | None = None  # why it ended: "stop" or "length"

    @classmethod
    def of(cls, sampling: Sampling, index: int = 0) -> Continuation:
        """The continuation of a call's `index`-th prompt: seeded with seed + index, so each prompt draws its own
        tokens and a prompt's tokens do not depend on what shares its batch."""
        return cls(sampling, np.random.default_rng(None if sampling.seed is None else sampling.seed + index))

    def advance(self, model: ExportedModel, logits: np.ndarray) -> str:
        """Pick and record the next token; returns the text it adds (possibly empty). Sets `reason` once done."""
        s = self.sampling
        token = pick_token(logits.astype(np.float64), s, self.rng)
        if token in model.eos_ids:
            self.reason = "stop"
            return ""
        self.out.append(token)
        text = model.decode(self.out)
        cut = min((text.index(x) for x in s.stop if x in text), default=None)
        if cut is not None:
            text, self.reason = text[:cut], "stop"
        elif len(self.out) >= s.max_new_tokens:
            self.reason = "length"
        elif text.endswith("\ufffd"):
            return ""  # half of a multi-byte character: wait for the rest
        self.text = text
        new, self.sent = text[self.sent :], len(text)
        return new


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu is installed, always CPU as the fallback."""
    found = available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in found]


def read_json_object(path: Path, format: str, required: tuple[str, ...], fix: str) -> dict:
    """A manifest qprompt wrote: UTF-8 JSON, an object, of `format`, with every `required` key (dotted for
    nested ones). Each problem is an ExportError naming it and `fix`."""
    data = read_json(path, fix)
    if not isinstance(data, dict) or data.get("format") != format:
        raise ExportError(f"{path} is not a {format} manifest; {fix}")
    for key in required:
        value = data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ExportError(f"{path} lacks the key {key!r}; {fix}")
            value = value[part]
    return data


def read_tokenizer(path: Path, fix: str):
    """The `tokenizers.Tokenizer` in tokenizer.json at `path`; a damaged file is an ExportError naming `fix`."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"{path} is damaged ({first}); {fix}") from exc


class ExportedModel:
    """An export folder, loaded: its graph in an onnxruntime session, its tokenizer and its tasks.

    A graph of several tasks (`qprompt export ART1 ART2 ...`) takes a task id per row; every method that
    encodes or scores takes `task=NAME` (None: the only task), and a batch may mix tasks."""

    def __init__(self, folder: str | Path, model_file: str | None = None, providers: list[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = m = ExportManifest.read(folder)
        from ..owned import plain

        if model_file is not None and not plain(model_file):
            raise ExportError(f"--model-file {model_file!r} is not a file name in {folder}: name a graph in the folder")
        self.model_path = path = self.folder / (model_file or m.model_file)
        for needed in (path, self.folder / "tokenizer.json"):
            if not needed.is_file():
                raise ExportError(f"export folder {folder} lacks {needed.name}; export again")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers or default_providers())
        except Exception as exc:  # onnxruntime raises its own types for corrupt files
            raise ExportError(f"{path} could not be loaded by onnxruntime ({str(exc).splitlines()[0]}); the file is "
                              "damaged or not an ONNX graph: export again") from exc
        names = {i.name for i in self.session.get_inputs()}
        self.past_names = [f"past_key_values.{i}.{kind}" for i in range(m.num_layers) for kind in ("key", "value")]
        missing = {"input_ids", "attention_mask", *self.past_names, *(["task_ids"] if m.task_ids_input else [])}
        missing -= names
        if missing or ("task_ids" in names) != m.task_ids_input:
            raise ExportError(f"{path} does not match {EXPORT_MANIFEST} (inputs {sorted(missing)[:3] or ['task_ids']}"
                              "); export again")
        self.tokenizer = read_tokenizer(self.folder / "tokenizer.json", "export again")
        self.fused = m.graph == "fused"
        self._shared: dict[str, tuple[np.ndarray, object]] = {}  # each bound cache buffer and its OrtValue
        past_type = next(i.type for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.cache_dtype = np.float16 if "float16" in past_type else np.float32
        self.pad_id = m.pad_token_id
        self.eos_ids = set(m.eos_token_ids)
        self._label_ids = {t.name: {label: self.encode(text, special=False) for label, text in t.label_targets.items()}
                           for t in m.tasks}

    # ------------------------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return self.manifest.task_names

    def task(self, name: str | None = None) -> TaskEntry:
        return self.manifest.task(name)

    def fields(self, task: str | None = None) -> list[str]:
        return self.task(task).template.fields

    @property
    def ensembles(self) -> dict[str, list[str]]:
        """Ensemble name -> its member tasks (`qprompt export A B --ensemble NAME`)."""
        return self.manifest.ensembles

    def label_ids(self, task: str | None = None) -> dict[str, list[int]]:
        """Each label's target token ids (empty for a generation task)."""
        members = self.ensembles.get(task)
        return self._label_ids[members[0] if members else self.task(task).name]

    # ------------------------------------------------------------------------------- tokens
    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def prompt_ids(self, row: dict | str, hard_prompt: bool = False, task: str | None = None,
                   truncate: bool = False) -> list[int]:
        """The task's template applied to a row (or to a string, for one-field templates). With `truncate`, an
        over-long prompt is cut as the recipe cut it in training and evaluation (its head, then its closing tokens),
        where the recipe says data.on_long: truncate."""
        entry = self.task(task)
        template = entry.template
        if isinstance(row, str):
            if len(template.fields) != 1:
                raise ExportError(f"this template needs fields {template.fields}: pass rows, not plain text")
            row = {template.fields[0]: row}
        missing = template.missing(row)
        if missing:
            raise ExportError(f"input row lacks field {missing[0]!r}; the template needs {', '.join(template.fields)}")
        ids = self.encode(template.text(row, hard_prompt), special=template.add_special_tokens)
        rule = entry.truncation if truncate else None
        if rule:
            reserve = max((len(t) for t in self.label_ids(entry.name).values()), default=0)
            budget = rule["max_length"] - entry.virtual_tokens - reserve
            if len(ids) > budget > rule["tail_tokens"]:
                ids = ids[: budget - rule["tail_tokens"]] + ids[-rule["tail_tokens"] :]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------------------- graph
    def empty_past(self, batch: int, capacity: int = 0) -> dict[str, np.ndarray]:
        """An empty cache: length 0 (written-out graph), or a zeroed buffer of `capacity` slots (fused graph)."""
        m = self.manifest
        shape = (batch, m.num_kv_heads, capacity if self.fused else 0, m.head_dim)
        return {n: np.zeros(shape, dtype=self.cache_dtype) for n in self.past_names}

    def task_ids(self, tasks: str | None | list[str | None], batch: int) -> np.ndarray:
        """(batch,) task ids: one name (or None) for every row, or one per row."""
        names = tasks if isinstance(tasks, list) else [tasks] * batch
        return np.array([self.manifest.task_id(t) for t in names], dtype=np.int64)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray],
                task_ids: np.ndarray | None = None):
        """One graph call: logits (B, L, V) and the cache after it. A fused graph writes into `past`'s buffers (numpy
        arrays, changed in place) and returns them; a written-out graph returns a new, longer cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.manifest.task_ids_input:
            feeds["task_ids"] = task_ids if task_ids is not None else self.task_ids(None, len(input_ids))
        try:
            if self.fused:
                return self._run_shared(feeds, past), past
            outputs = self.session.run(None, {**feeds, **past})
        except Exception as exc:  # onnxruntime's own error types: a graph or manifest that does not fit
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ExportError(f"onnxruntime could not run {self.model_path.name} in {self.folder} ({first}); the "
                              f"graph and {EXPORT_MANIFEST} do not match or a file is damaged: export again") from exc
        return outputs[0], dict(zip(self.past_names, outputs[1:]))

    def _run_shared(self, feeds: dict[str, np.ndarray], past: dict[str, np.ndarray]) -> np.ndarray:
        """A fused graph's call: each layer's buffer bound as its past and its present, so attention writes the new
        keys/values into it in place (onnxruntime-genai's past_present_share_buffer)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("logits")
        for name, buffer in past.items():
            cached = self._shared.get(name)
            if cached is None or cached[0] is not buffer:  # a new buffer (joined, grown, kept rows): wrap it once
                cached = self._shared[name] = (buffer, ort.OrtValue.ortvalue_from_numpy(buffer))  # shares its memory
            binding.bind_ortvalue_input(name, cached[1])
            binding.bind_ortvalue_output(name.replace("past_key_values", "present", 1), cached[1])
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def prompt_logits(self, prompts: list[list[int]], task_ids: np.ndarray | None = None,
                      last: int | None = None) -> list[np.ndarray]:
        """One pass over a batch of prompts (no cache before them): each prompt's logits (its length, V), or only its
        `last` positions."""
        ids, mask = self._pad(prompts)
        past = self.empty_past(len(prompts), self.manifest.prefix_slots + ids.shape[1] + 2)
        logits, _ = self.forward(ids, mask, past, task_ids)
        rows = []
        for r, seq in enumerate(prompts):
            start = 0 if self.fused else ids.shape[1] - len(seq)  # right padding, or left
            keep = len(seq) if last is None else min(last, len(seq))
            rows.append(logits[r, start + len(seq) - keep : start + len(seq)])
        return rows

    def _pad(self, seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """A batch as the graph takes it: right-padded for a fused graph, left-padded for a written-out one."""
        if not all(seqs):
            raise ExportError("an input has no tokens (empty text): give some text to continue")
        limit = self.manifest.max_positions
        if max(len(s) for s in seqs) > limit:
            raise ExportError(f"an input has {max(len(s) for s in seqs)} tokens; this export takes at most {limit}")
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id if self.pad_id is not None else 0, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            cols = slice(0, len(s)) if self.fused else slice(width - len(s), width)
            ids[i, cols] = s
            mask[i, cols] = 1
        return ids, mask

    # ------------------------------------------------------------------------------- work
    def generate_ids(self, prompts: list[list[int]], sampling: Sampling | None = None,
                     task: str | None | list[str | None] = None) -> list[list[int]]:
        """Continue each prompt, decoded together with a KV cache: greedy, or sampled (prompt i seeded with seed + i,
        as `qprompt serve` does); a row stops at EOS, a stop string or max_new_tokens."""
        return [c.out for c in self.continue_batch(prompts, sampling or Sampling(), task)]

    def continue_batch(self, prompts: list[list[int]], sampling: Sampling,
                       task: str | None | list[str | None] = None) -> list[Continuation]:
        """The Continuation of each prompt, decoded together; finished rows leave the batch."""
        continuations = [Continuation.of(sampling, i) for i in range(len(prompts))]
        batch = DecodeBatch(self)
        logits = batch.join(prompts, self.task_ids(task, len(prompts)), reserve=sampling.max_new_tokens)
        rows = list(range(len(prompts)))  # which prompt each row of the batch continues
        while rows:
            tokens, going = [], []
            for r, i in enumerate(rows):
                continuations[i].advance(self, logits[r])
                if continuations[i].reason is None:
                    tokens.append(continuations[i].out[-1])
                    going.append(r)
            if not going:
                break
            if len(going) < len(rows):  # finished rows leave the batch: no more work spent on them
                batch.keep(going)
                rows = [rows[r] for r in going]
            logits = batch.step(np.array(tokens))
        return continuations

    def generate(self, inputs: list[dict | str], sampling: Sampling | None = None, raw: bool = False,
                 task: str | None = None, truncate: bool = False) -> list[str]:
        prompts = [self.encode(x) if raw else self.prompt_ids(x, task=task, truncate=truncate) for x in inputs]
        return [c.text.strip() for c in self.continue_batch(prompts, sampling or Sampling(), task)]

    def label_scores(self, prompts: list[list[int]], batch_size: int = 16,
                     task: str | None | list[str | None] = None) -> np.ndarray:
        """Sum of log-probabilities of each label's tokens after each prompt: (N, labels). A list of tasks (one per
        prompt) scores a mixed batch; its tasks must share their labels' names and order. An ensemble's score is the
        log of its members' mean label probability (each member's scores normalised over the labels)."""
        if isinstance(task, str) and task in self.ensembles:
            return self.ensemble_scores(prompts, task, batch_size)
        tasks = task if isinstance(task, list) else [task] * len(prompts)
        if any(t in self.ensembles for t in tasks):
            raise ExportError("a mixed batch cannot hold an ensemble's rows; score them on their own")
        label_ids = [self.label_ids(t) for t in tasks]
        labels = list(label_ids[0]) if label_ids else []
        if any(list(ids) != labels for ids in label_ids):
            raise ExportError("a mixed batch must share its labels; score each task's rows on their own")
        scores = np.zeros((len(prompts), len(labels)))
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            targets = label_ids[start : start + batch_size]
            task_ids = self.task_ids(tasks[start : start + batch_size], len(chunk))
            if all(len(t[lab]) == 1 for t in targets for lab in labels):  # one pass scores every label
                last = np.stack([row[-1] for row in self.prompt_logits(chunk, task_ids, last=1)])
                logp = log_softmax(last)
                for r, t in enumerate(targets):
                    scores[start + r] = logp[r, [t[lab][0] for lab in labels]]
                continue
            for j, lab in enumerate(labels):
                longest = max(len(t[lab]) for t in targets)
                rows = self.prompt_logits([p + t[lab] for p, t in zip(chunk, targets)], task_ids, last=longest + 1)
                for r, t in enumerate(targets):  # the logits before each target token
                    target = t[lab]
                    logp = log_softmax(rows[r][-len(target) - 1 : -1])
                    scores[start + r, j] = logp[np.arange(len(target)), target].sum()
        return scores

    def ensemble_scores(self, prompts: list[list[int]], ensemble: str, batch_size: int = 16) -> np.ndarray:
        """Every prompt through every member prompt in one mixed batch, then log(mean over members of each member's
        label probabilities): (N, labels)."""
        members = self.ensembles[ensemble]
        scores = self.label_scores(prompts * len(members), batch_size,
                                   [m for m in members for _ in prompts])  # member-major: member k's rows together
        probs = np.exp(log_softmax(scores.reshape(len(members), len(prompts), -1)))
        return np.log(probs.mean(axis=0))

    def classify(self, inputs: list[dict | str], hard_prompt: bool = False, batch_size: int = 16,
                 task: str | None = None, truncate: bool = False) -> list[str]:
        """Each input's most likely label; `truncate`: over-long inputs cut as the recipe cut them (prompt_ids)."""
        labels = list(self.label_ids(task))
        if not labels:
            raise ExportError("this export comes from a generation recipe: use generate, not classify")
        # Similar lengths together: less padding per batch.
        prompts = [self.prompt_ids(x, hard_prompt, task, truncate) for x in inputs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        scores = self.label_scores([prompts[i] for i in order], batch_size, task)
        result = [""] * len(prompts)
        for k, i in enumerate(order):
            result[i] = labels[int(scores[k].argmax())]
        return result


class DecodeBatch:
    """Sequences decoding together through one KV cache.

    Rows join after their own prefill (`join`) and leave once finished (`keep`), between any two steps:
    a row's padding is masked, and positions are counted per row, so a row's tokens do not depend on which
    other rows share its batch or when they came. `qprompt serve` batches concurrent requests this way;
    `ExportedModel.generate_ids` is the same loop with every row joining at once.

    Fused graph: each layer's cache is one buffer (rows, kv heads, capacity, head dim) that the graph writes in
    place; a row's tokens sit at the start of its row (the prompt's slots first), `lengths` counts them, the
    mask is right-padded, and the capacity doubles when a step would not fit. Written-out graph: the cache
    holds real tokens only, left-padded to a common length, and grows by one column a step.
    """

    def __init__(self, model: ExportedModel):
        self.model = model
        self.lengths = np.zeros(0, dtype=np.int64)  # real tokens cached per row
        self.mask = np.zeros((0, 0), dtype=np.int64)  # written-out graph: (rows, cached tokens), 1 real, 0 padding
        self.past = model.empty_past(0)
        self.task_ids = np.zeros(0, dtype=np.int64)  # each row's task (graphs of several tasks)

    def __len__(self) -> int:
        return len(self.lengths)

    def join(self, prompts: list[list[int]], task_ids: np.ndarray | None = None, reserve: int = 0) -> np.ndarray:
        """Prefill `prompts` as one batch and append them as the last rows: their next-token logits (B, vocab).
        `reserve`: tokens each row may still generate (a fused graph's buffer is made that much bigger)."""
        m = self.model
        task_ids = task_ids if task_ids is not None else m.task_ids(None, len(prompts))
        ids, mask = m._pad(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        past = m.empty_past(len(prompts), m.manifest.prefix_slots + ids.shape[1] + reserve + 2)
        logits, past = m.forward(ids, mask, past, task_ids)
        self.task_ids = np.concatenate([self.task_ids, task_ids])
        if m.fused:
            capacity = max(self._capacity(), past[m.past_names[0]].shape[2])
            self.past = {n: np.concatenate([_pad_right(self.past[n], capacity, 2), _pad_right(past[n], capacity, 2)])
                         for n in self.past}
            self.lengths = np.concatenate([self.lengths, lengths])
            return logits[np.arange(len(prompts)), lengths - 1]
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = np.concatenate([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.past = {n: np.concatenate([_pad_left(self.past[n], width, 2), _pad_left(past[n], width, 2)])
                     for n in self.past}
        self.lengths = np.concatenate([self.lengths, lengths])
        return logits[:, -1]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed each row its next token (B,): the logits (B, vocab) for the token after it."""
        m = self.model
        ids = tokens.astype(np.int64)[:, None]
        if m.fused:
            width = int(self.lengths.max()) + 1
            # Room for this token and, as the graph's end-of-buffer guard wants, one more after it.
            need = m.manifest.prefix_slots + width + 1
            if need > self._capacity():
                self.past = {n: _pad_right(v, max(need, 2 * self._capacity()), 2) for n, v in self.past.items()}
            mask = (np.arange(width)[None, :] <= self.lengths[:, None]).astype(np.int64)
            logits, self.past = m.forward(ids, mask, self.past, self.task_ids)
        else:
            self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
            logits, self.past = m.forward(ids, self.mask, self.past, self.task_ids)
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); a written-out graph's cache drops the columns that are padding in all."""
        self.task_ids = self.task_ids[rows]
        self.lengths = self.lengths[rows]
        self.past = {n: v[rows] for n, v in self.past.items()}
        if self.model.fused:
            return
        self.mask = self.mask[rows]
        if len(rows):
            first = int(self.mask.argmax(axis=1).min())  # the earliest real token of any row
            self.mask = self.mask[:, first:]
            self.past = {n: v[:, :, first:] for n, v in self.past.items()}

    def _capacity(self) -> int:
        return next(iter(self.past.values())).shape[2] if self.past else 0


def _pad_left(x: np.ndarray, width: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (width - x.shape[axis], 0)
    return np.pad(x, pad)


def _pad_right(x: np.ndarray, width: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, width - x.shape[axis])
    return np.pad(x, pad)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def pick_token(logits: np.ndarray, s: Sampling, rng: np.random.Generator) -> int:
    if s.temperature <= 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = np.sort(logits)[-min(s.top_k, len(logits))]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1.0:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p  # smallest set reaching top_p
        keep[0] = True  # the most likely token is always a candidate, so top_p 0 is greedy, not NaN
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
