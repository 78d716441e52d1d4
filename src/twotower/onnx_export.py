"""Optional ONNX export of the query tower, checked against PyTorch before it is kept.

The exported graph is :meth:`QueryTower.forward`: encoded user features (one input per field, in
field order) plus, when the model has a history, the event rows ``history_ids``, ``history_valid``
and ``history_recency`` (and ``history_actions``), all with a dynamic batch axis (multi-hot features
with a dynamic token axis too). Raw values are encoded to these tensors by the run's ``FeatureEncoder``
(shipped in ``catalogue.json``), as the Python service does. Needs ``pip install twotower[onnx]``
(onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from twotower.query_tower import QueryTower
from twotower.storage import atomic_write_bytes

__all__ = ["export_onnx", "onnx_inputs"]


def onnx_inputs(
    query: QueryTower, batch: int = 4, seed: int = 0
) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    """Input names and a random but valid example batch (stored users' features, real events)."""
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(0, query.num_users, (batch,), generator=gen)
    features = query.stored_features(users)
    names = [f"feature_{f.name}" for f in query.user_fields]
    tensors = [features[f.name] for f in query.user_fields]
    if query.history is not None:
        sequences, actions = [], []
        for u in users.tolist():
            items, acts = query.stored_events(u)
            sequences.append(items)
            actions.append(acts if acts is not None else torch.zeros(len(items), dtype=torch.long))
        with_actions = query.history.action_embedding is not None
        ids, valid, recency, acts = query.history.event_rows(sequences, actions if with_actions else None)
        names += ["history_ids", "history_valid", "history_recency"]
        tensors += [ids, valid, recency]
        if with_actions:
            names.append("history_actions")
            tensors.append(acts)
    return names, tuple(tensors)


def export_onnx(query: QueryTower, path: str | Path, tolerance: float = 1e-4) -> dict[str, Any]:
    """Write ``path`` (atomically) and return ``{"max_abs_diff", "inputs", "opset"}``; raises when
    onnxruntime's output differs from PyTorch's by more than ``tolerance``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "ONNX export needs `pip install twotower[onnx]` (onnx, onnxscript, onnxruntime)"
        ) from exc
    if query.user_tower.config.precision == "bf16":
        # Traced, autocast becomes bfloat16 Gemm nodes, which onnxruntime's CPU provider lacks: it
        # would fail with NOT_IMPLEMENTED at the check, naming neither the setting nor a way out.
        raise ValueError(
            "ONNX export of a query tower with model.user_tower.precision 'bf16' is not supported "
            "(onnxruntime's CPU provider has no bfloat16 matrix product): export without --onnx"
        )
    query.eval()
    names, example = onnx_inputs(query)
    batch = torch.export.Dim("batch", min=1)
    # A multi-hot row is as wide as the encoder makes it (its number of tokens when the feature has no
    # max_len, e.g. a cold-start user with more tags than any stored user): its token axis is dynamic
    # too. Padding (code 0) does not change an EmbeddingBag's mean, and an example width of 2 or more
    # keeps torch.export from specialising the axis to 1.
    multi_hot = [f.kind == "multi_hot" for f in query.user_fields]
    multi_hot += [False] * (len(example) - len(multi_hot))
    example = tuple(_pad_tokens(t, 2) if mh else t for t, mh in zip(example, multi_hot, strict=True))
    shapes = tuple(
        {0: batch, 1: torch.export.Dim(f"{name}_tokens", min=1)} if mh else {0: batch}
        for name, mh in zip(names, multi_hot, strict=True)
    )
    program = torch.onnx.export(
        query,
        example,
        input_names=names,
        output_names=["query_embedding"],
        dynamic_shapes=(shapes,),
        dynamo=True,
    )
    data = program.model_proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    _, check = onnx_inputs(query, batch=7, seed=1)  # another batch size: the batch axis must be dynamic
    # ... and another multi-hot width
    check = tuple(_pad_tokens(t, t.shape[1] + 1) if mh else t for t, mh in zip(check, multi_hot, strict=True))
    got = session.run(None, {n: t.numpy() for n, t in zip(names, check, strict=True)})[0]
    with torch.no_grad():
        want = query(*check).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= tolerance:
        raise ValueError(f"the ONNX query tower differs from PyTorch by {diff:.2e} (> {tolerance:.0e})")
    atomic_write_bytes(Path(path), data)
    return {"max_abs_diff": diff, "inputs": names, "opset": int(program.model_proto.opset_import[0].version)}


def _pad_tokens(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Multi-hot codes [B, L] padded with code 0 (the EmbeddingBag's padding_idx) to at least ``width``."""
    return torch.nn.functional.pad(codes, (0, max(0, width - codes.shape[1])))
