"""Calibration statistics of the activations feeding each rewrite site, collected with ONNX Runtime.

The tensor read by each site (norm output, o_proj input, down_proj input) becomes an extra output of the
serialized graph given to ONNX Runtime (the model itself is left as it was), and token windows are run one at a time; statistics are updated
in float64 after each window, so memory is bounded by one window's activations (plus the optional
[C, C] second moments). The result is an explicit :class:`CalibrationStats` handed to passes such as
``SmoothPass(stats=stats)``.

Statistics describe the graph they were collected on: collect them on the graph the pass will rewrite
(e.g. after :class:`FoldNormPass` when smoothing follows it), since folding changes the norm outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import hashlib
from typing import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from qexport.errors import QexportError
from qexport.runtimes.ort_session import cpu_session
from qexport.passes.discovery import sites as site_matching
from qexport.passes.discovery.names import NameFilter

log = logging.getLogger(__name__)

# per-token absmax histogram: log10 bins from 1e-4 to 1e8
_HIST_EDGES = np.logspace(-4, 8, 241)


@dataclasses.dataclass
class TensorStats:
    """Running statistics of one activation, per channel (last axis) and per token (row)."""

    channels: int
    tokens: int = 0
    absmax: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    channel_min: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    channel_max: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    sum_squares: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    token_absmax_hist: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    token_absmax_max: float = 0.0
    token_absmax_sum: float = 0.0
    second_moment: np.ndarray | None = None  # running sum of x x^T, [C, C]; None when not collected

    def __post_init__(self) -> None:
        c = self.channels
        self.absmax = np.zeros(c) if self.absmax is None else self.absmax
        self.channel_min = np.full(c, np.inf) if self.channel_min is None else self.channel_min
        self.channel_max = np.full(c, -np.inf) if self.channel_max is None else self.channel_max
        self.sum_squares = np.zeros(c) if self.sum_squares is None else self.sum_squares
        if self.token_absmax_hist is None:
            self.token_absmax_hist = np.zeros(len(_HIST_EDGES) + 1, dtype=np.int64)

    @classmethod
    def empty(cls, channels: int, hessian: bool = False) -> "TensorStats":
        return cls(channels, second_moment=np.zeros((channels, channels)) if hessian else None)

    def update(self, x: np.ndarray) -> None:
        """Add the rows of ``x`` ([..., channels]) to the statistics."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.channels)
        a = np.abs(x)
        self.tokens += x.shape[0]
        np.maximum(self.absmax, a.max(axis=0), out=self.absmax)
        np.minimum(self.channel_min, x.min(axis=0), out=self.channel_min)
        np.maximum(self.channel_max, x.max(axis=0), out=self.channel_max)
        self.sum_squares += np.einsum("tc,tc->c", x, x)
        per_token = a.max(axis=1)
        self.token_absmax_hist += np.bincount(np.searchsorted(_HIST_EDGES, per_token), minlength=len(_HIST_EDGES) + 1)
        self.token_absmax_max = max(self.token_absmax_max, float(per_token.max()))
        self.token_absmax_sum += float(per_token.sum())
        if self.second_moment is not None:
            self.second_moment += x.T @ x

    @property
    def l2(self) -> np.ndarray:
        """Per-channel L2 norm over all tokens (SmoothRot's channel magnitude)."""
        return np.sqrt(self.sum_squares)

    @property
    def token_absmax_mean(self) -> float:
        return self.token_absmax_sum / max(self.tokens, 1)

    def token_absmax_quantile(self, q: float) -> float:
        """Approximate quantile (0..1) of the per-token absmax, read off the log histogram (upper bin edge)."""
        cumulative = np.cumsum(self.token_absmax_hist)
        k = int(np.searchsorted(cumulative, q * cumulative[-1]))
        return float(_HIST_EDGES[min(k, len(_HIST_EDGES) - 1)])

    def hessian(self) -> np.ndarray:
        """Mean second moment X^T X / N ([C, C]); GPTQ's H is twice this."""
        if self.second_moment is None:
            raise QexportError("second moments were not collected for this tensor; list its site in hessian=")
        return self.second_moment / max(self.tokens, 1)


@dataclasses.dataclass
class CalibrationStats:
    """Statistics per site name (``layers.0.attn_norm``, ``layers.3.v_o``, ...), and how they were gathered."""

    sites: dict[str, TensorStats]
    windows: int = 0
    tokens: int = 0
    fingerprint: str = ""  # content hash, set by collect_stats; marks which statistics a pass used
    head: "CalibrationStats | None" = None  # the same statistics over the first ``head_windows`` windows only
    probe_logits: np.ndarray | None = None  # logits of the ``probe`` window, run in the same session

    def __getitem__(self, site_name: str) -> TensorStats:
        try:
            return self.sites[site_name]
        except KeyError:
            raise QexportError(f"no calibration statistics for site {site_name!r}; collect them again") from None

    def __contains__(self, site_name: str) -> bool:
        return site_name in self.sites


def collect_stats(
    model: ir.Model,
    windows: Iterable[np.ndarray],
    *,
    site_map: site_matching.SiteMap | None = None,
    hessian: tuple[str, ...] = (),
    threads: int | None = None,
    head_windows: int = 0,
    probe: np.ndarray | None = None,
) -> CalibrationStats:
    """Run ``windows`` (int64 token arrays, [seq] or [batch, seq]) through ``model`` (left unchanged).

    ``hessian`` lists globs of site names whose running X^T X is also kept. With ``head_windows`` > 0,
    ``stats.head`` holds the statistics of the first ``head_windows`` windows alone (a second, smaller sample
    from the same runs). ``probe``, a token window run through the same session but not counted in the
    statistics, gives ``stats.probe_logits`` (one session serves calibration and an equivalence check).
    """
    site_map = site_map or site_matching.find_sites(model)
    targets = {site.name: site.activation.name for site in site_map.all}
    if not targets:
        raise QexportError("the graph has no rewrite sites to calibrate")
    names = sorted(set(targets.values()))
    session = session_with_outputs(model, names, threads)
    stats = CalibrationStats({})
    head = CalibrationStats({}) if head_windows > 0 else None
    inputs, wanted = {i.name: i for i in session.get_inputs()}, NameFilter(hessian)
    for window in windows:
        feeds = prefill_feeds(np.asarray(window, dtype=np.int64), inputs, model)
        outputs = dict(zip(names, session.run(names, feeds)))
        for into in (stats, head) if head is not None and head.windows < head_windows else (stats,):
            _add_window(into, targets, outputs, feeds["input_ids"].size, wanted)
        log.debug("calibration window %d (%d tokens)", stats.windows, feeds["input_ids"].size)
    if stats.windows == 0:
        raise QexportError("no calibration windows were given")
    if probe is not None:
        stats.probe_logits = session.run(["logits"], prefill_feeds(np.asarray(probe, dtype=np.int64), inputs, model))[0]
    stats.fingerprint = _fingerprint(stats)
    if head is not None:
        head.fingerprint = _fingerprint(head)
        stats.head = head
    log.info("calibrated %d sites on %d windows (%d tokens)", len(targets), stats.windows, stats.tokens)
    return stats


def _add_window(stats: CalibrationStats, targets: dict[str, str], outputs: dict[str, np.ndarray], tokens: int,
                hessian: NameFilter) -> None:
    for site_name, value_name in targets.items():
        x = outputs[value_name]
        if site_name not in stats.sites:
            wants_h = hessian.matches(site_name)
            stats.sites[site_name] = TensorStats.empty(x.shape[-1], hessian=wants_h)
        stats.sites[site_name].update(x)
    stats.windows += 1
    stats.tokens += tokens


def _fingerprint(stats: CalibrationStats) -> str:
    """A content hash of the statistics: the same graph and text give the same fingerprint (reproducible files)."""
    digest = hashlib.sha256()
    for name in sorted(stats.sites):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(stats.sites[name].absmax).tobytes())
        digest.update(np.ascontiguousarray(stats.sites[name].sum_squares).tobytes())
    return digest.hexdigest()[:32]


def session_with_outputs(model: ir.Model, names: list[str], threads: int | None, inputs: Sequence[str] = ()):
    """An ONNX Runtime session on ``model`` that also returns the values ``names``; the initializers named in
    ``inputs`` become overridable inputs (fed at each run, e.g. biases being searched). ``model`` is serialized
    with these extra outputs and inputs (its large initializers handed over in memory, see
    :mod:`qexport.runtimes.ort_session`), which are taken off again: it is left as it was."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    added_outputs = [values[n] for n in dict.fromkeys(names) if not values[n].is_graph_output()]
    added_inputs = [graph.initializers[n] for n in inputs if not graph.initializers[n].is_graph_input()]
    graph.outputs.extend(added_outputs)
    graph.inputs.extend(added_inputs)
    try:
        return cpu_session(model, threads, as_written=True)
    finally:
        for _ in added_outputs:  # pop, not slice deletion: only pop updates the values' graph-output marks
            graph.outputs.pop()
        for _ in added_inputs:
            graph.inputs.pop()


def prefill_feeds(window: np.ndarray, inputs: dict, model: ir.Model) -> dict[str, np.ndarray]:
    ids = window[None, :] if window.ndim == 1 else window
    batch, seq = ids.shape
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}
    if "position_ids" in inputs:
        feeds["position_ids"] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
    for value in model.graph.inputs:
        if value.name not in feeds:  # past key/values: empty cache [batch, kv_heads, 0, head_dim]
            shape = [batch if i == 0 else 0 if i == 2 else int(d) for i, d in enumerate(value.shape)]
            feeds[value.name] = np.zeros(shape, dtype=value.dtype.numpy())
    return feeds


class ValueSession:
    """One ONNX Runtime session on ``model`` giving the graph values ``names`` for a token window (prefill with an
    empty cache); the initializers named in ``inputs`` are fed at each run (e.g. biases being searched), from
    ``overrides``. ``model`` must not change while the session is in use (its past key/value inputs shape the feeds).
    """

    def __init__(self, model: ir.Model, names: Sequence[str], threads: int | None = None, inputs: Sequence[str] = ()):
        self.names = list(names)
        self._model = model
        self._session = session_with_outputs(model, self.names, threads, inputs)
        self._inputs = {i.name: i for i in self._session.get_inputs()}

    def run(self, window: np.ndarray, overrides: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Name -> array of each value in ``names`` for ``window`` (token ids, [seq] or [batch, seq])."""
        feeds = prefill_feeds(np.asarray(window, dtype=np.int64), self._inputs, self._model)
        feeds.update(overrides or {})
        return dict(zip(self.names, self._session.run(self.names, feeds)))


def run_values(model: ir.Model, names: list[str], windows, threads: int | None = None):
    """Yield, for each calibration window (token ids), a dict name -> array of the graph values ``names``,
    from one ONNX Runtime session on ``model`` (prefill with an empty cache)."""
    session = ValueSession(model, names, threads)
    for window in windows:
        yield session.run(window)
