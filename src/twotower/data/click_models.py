"""Click models with known truth: who examines which rank, and who clicks what they examine.

Ranked lists are arrays ``labels[S, N]`` (graded true relevance of the document shown at rank
``j + 1`` in session ``s``; ``-1`` marks an empty slot, which is never examined or clicked) plus a
device index per session ``device[S]``. Everything is deterministic given the ``numpy`` generator.

Relevance to click (ULTRA's protocol, see shared/docs/anchors.md)::

    P(R = 1 | y) = eps + (1 - eps) * (2^y - 1) / (2^ymax - 1),   eps = 0.1 by default

Examination per rank comes from a curve per device (:class:`ExaminationConfig`): the ULTRA table
``base_k^eta`` (ranks past the table reuse its last value) or ``(1 / k)^eta``, or an explicit table.

* **Position-based model** (``pbm``): ``P(C = 1 | k, y, device) = theta_device(k) * P(R = 1 | y)``.
* **Cascade** (``cascade``): the user scans from rank 1 and clicks an examined document with
  ``P(R = 1 | y)``; after a click they stop with probability ``stop_after_click`` (1 is the classic
  cascade of Craswell et al. 2008, one click at most), and without a click they go on to the next rank
  with probability ``theta_device(k + 1) / theta_device(k)`` so that, up to the first click, the
  examination curve equals the device's curve (``continuation="curve"``), or always
  (``continuation="always"``). Either way rank 1 is examined with ``theta_device(1)``, so "always" is
  the classic cascade (rank 1 always examined) only for a curve with ``theta(1) = 1``.
* **Trust bias** (``trust``, Agarwal et al. 2019): an examined document is clicked with
  ``eps_plus(k)`` when relevant and ``eps_minus(k)`` when not, relevance itself being drawn with
  ``P(R = 1 | y)``: ``P(C = 1) = theta(k) * (eps_plus(k) P(R) + eps_minus(k) (1 - P(R)))`` with
  ``eps_plus(k) = 1`` and ``eps_minus(k) = trust_minus / k`` by default.

:meth:`ClickModel.click_probability` gives the exact marginal click probability of every slot
(for the cascade, by the product of the stop probabilities above it) and :meth:`ClickModel.examination`
the exact examination probability; :meth:`ClickModel.simulate` draws clicks from the same model.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ULTRA_EXAMINATION",
    "ClickModel",
    "ClickModelConfig",
    "ExaminationConfig",
    "examination_curve",
    "relevance_click_probability",
]

# ULTRA's examination base per rank 1-10 (shared/docs/anchors.md); ranks past 10 reuse the last value.
ULTRA_EXAMINATION = (0.68, 0.61, 0.48, 0.34, 0.28, 0.20, 0.11, 0.10, 0.08, 0.06)


class ExaminationConfig(BaseModel):
    """One device's examination curve over ranks 1, 2, ..."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ultra", "inverse", "table"] = "ultra"
    eta: float = Field(1.0, ge=0.0, description="severity: base_k^eta (ultra, table) or (1/k)^eta")
    table: list[float] | None = Field(None, description="examination per rank for kind='table'")
    share: float = Field(1.0, gt=0.0, description="relative share of sessions on this device")

    @model_validator(mode="after")
    def _table(self) -> ExaminationConfig:
        if (self.kind == "table") != (self.table is not None):
            raise ValueError("give `table` exactly when kind='table'")
        if self.table is not None and not self.table:  # all() of [] is True; the curve would IndexError
            raise ValueError("`table` needs at least one rank")
        if self.table is not None and not all(0.0 < p <= 1.0 for p in self.table):
            raise ValueError("examination probabilities must lie in (0, 1]")
        return self


def examination_curve(config: ExaminationConfig, num_positions: int) -> np.ndarray:
    """``theta(k)`` for ranks ``k = 1 .. num_positions`` as a float64 array."""
    ranks = np.arange(1, num_positions + 1)
    if config.kind == "inverse":
        return (1.0 / ranks) ** config.eta
    base = np.asarray(ULTRA_EXAMINATION if config.kind == "ultra" else config.table, dtype=np.float64)
    return base[np.minimum(ranks, len(base)) - 1] ** config.eta


def relevance_click_probability(labels: np.ndarray, max_label: int, epsilon: float = 0.1) -> np.ndarray:
    """``eps + (1 - eps) (2^y - 1) / (2^ymax - 1)``; slots with ``y < 0`` (padding) get 0."""
    if max_label < 1:  # 2^0 - 1 = 0: the gain would be 0/0 = nan and no document ever clicked
        raise ValueError(f"max_label must be >= 1, got {max_label}")
    labels = np.asarray(labels)
    gain = (np.exp2(np.clip(labels, 0, max_label)) - 1.0) / (2.0**max_label - 1.0)
    return np.where(labels >= 0, epsilon + (1.0 - epsilon) * gain, 0.0)


def _default_devices() -> dict[str, ExaminationConfig]:
    # Two devices with different severities, so the bias tower has a position x device interaction
    # to learn: desktop follows the ULTRA table, mobile its square (attention falls off faster).
    return {"desktop": ExaminationConfig(), "mobile": ExaminationConfig(eta=2.0)}


class ClickModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["pbm", "cascade", "trust"] = "pbm"
    epsilon: float = Field(0.1, ge=0.0, le=1.0, description="click noise on irrelevant documents")
    devices: dict[str, ExaminationConfig] = Field(default_factory=_default_devices)
    stop_after_click: float = Field(1.0, ge=0.0, le=1.0, description="cascade: P(stop | click)")
    continuation: Literal["curve", "always"] = "curve"
    trust_plus: float = Field(1.0, gt=0.0, le=1.0, description="trust: eps_plus(k), any rank")
    trust_minus: float = Field(0.65, ge=0.0, le=1.0, description="trust: eps_minus(k) = this / k")

    @model_validator(mode="after")
    def _some_device(self) -> ClickModelConfig:
        if not self.devices:
            raise ValueError("at least one device is needed")
        return self


class ClickModel:
    """Exact click and examination probabilities of ranked lists, and clicks drawn from them."""

    def __init__(self, config: ClickModelConfig, max_label: int, num_positions: int) -> None:
        self.config = config
        self.max_label = max_label
        self.num_positions = num_positions
        self.device_names = list(config.devices)
        # [devices, positions]: the true curve of every device.
        self.curves = np.stack([examination_curve(d, num_positions) for d in config.devices.values()])
        shares = np.array([d.share for d in config.devices.values()])
        self.device_shares = shares / shares.sum()

    def sample_devices(self, num_sessions: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(self.device_names), size=num_sessions, p=self.device_shares)

    def _check(self, labels: np.ndarray, device: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labels = np.asarray(labels)
        device = np.asarray(device)
        if labels.ndim != 2 or labels.shape[1] > self.num_positions:
            raise ValueError(f"labels must be [sessions, <= {self.num_positions}], got {labels.shape}")
        if device.shape != labels.shape[:1]:
            raise ValueError(f"device must be [{labels.shape[0]}], got {device.shape}")
        n_dev = len(self.device_names)
        # A negative index would silently pick another device's curve (numpy counts from the end).
        if device.size and (device.dtype.kind not in "iu" or device.min() < 0 or device.max() >= n_dev):
            raise ValueError(
                f"device must hold device indices 0..{n_dev - 1} ({self.device_names}), got {device}"
            )
        return labels, device

    def _relevant(self, labels: np.ndarray) -> np.ndarray:
        return relevance_click_probability(labels, self.max_label, self.config.epsilon)

    def _click_given_examined(self, labels: np.ndarray) -> np.ndarray:
        p_rel = self._relevant(labels)
        if self.config.model != "trust":
            return p_rel
        ranks = np.arange(1, labels.shape[1] + 1)
        minus = self.config.trust_minus / ranks
        return np.where(labels >= 0, self.config.trust_plus * p_rel + minus * (1.0 - p_rel), 0.0)

    def _continue(self, device: np.ndarray, n: int) -> np.ndarray:
        """Cascade: P(go on to rank k + 1 | no click at rank k), shape [S, n]."""
        if self.config.continuation == "always":
            return np.ones((len(device), n))
        curve = self.curves[device, :n]
        ratio = np.ones_like(curve)
        # min(1, .): a table that rises again cannot be followed by continuing alone.
        ratio[:, :-1] = np.minimum(1.0, curve[:, 1:] / curve[:, :-1])
        return ratio

    def examination(self, labels: np.ndarray, device: np.ndarray) -> np.ndarray:
        """Exact P(E = 1) of every slot, [S, N]; padding slots get 0."""
        labels, device = self._check(labels, device)
        n = labels.shape[1]
        valid = labels >= 0
        if self.config.model != "cascade":
            return np.where(valid, self.curves[device, :n], 0.0)
        click = np.where(valid, self._click_given_examined(labels), 0.0)
        stop_click = self.config.stop_after_click
        go_on = click * (1.0 - stop_click) + (1.0 - click) * self._continue(device, n)
        # Rank 1 is examined with the device's first value; rank k + 1 when rank k was examined and
        # the user went on. Padding slots are skipped over (examined with the same probability).
        exam = np.empty_like(click)
        exam[:, 0] = self.curves[device, 0]
        for j in range(1, n):
            exam[:, j] = exam[:, j - 1] * np.where(valid[:, j - 1], go_on[:, j - 1], 1.0)
        return np.where(valid, exam, 0.0)

    def click_probability(self, labels: np.ndarray, device: np.ndarray) -> np.ndarray:
        """Exact marginal P(C = 1) of every slot, [S, N]."""
        labels, device = self._check(labels, device)
        return self.examination(labels, device) * self._click_given_examined(labels)

    def simulate(self, labels: np.ndarray, device: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw clicks, float32 [S, N] of 0/1."""
        labels, device = self._check(labels, device)
        n = labels.shape[1]
        valid = labels >= 0
        p_click = self._click_given_examined(labels)
        if self.config.model != "cascade":
            return (rng.random(labels.shape) < self.curves[device, :n] * p_click).astype(np.float32)
        clicks = np.zeros(labels.shape, dtype=np.float32)
        going = rng.random(len(device)) < self.curves[device, 0]  # is rank 1 examined at all
        cont = self._continue(device, n)
        for j in range(n):
            here = going & valid[:, j]
            clicked = here & (rng.random(len(device)) < p_click[:, j])
            clicks[:, j] = clicked
            draw = rng.random(len(device))
            stays = np.where(clicked, draw >= self.config.stop_after_click, draw < cont[:, j])
            going = going & np.where(valid[:, j], stays, True)
        return clicks
