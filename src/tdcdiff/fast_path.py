"""The fast sampling path: SamplingModel, the sampling loop's one call of the denoiser (a router's expert from a
table, each expert traced and frozen with torch.jit or torch.compile'd, optionally under bf16 autocast, and with
feature caching its full and shallow passes traced alike), and CompiledExpert, one traced denoiser."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .feature_cache import FeatureCache, FullPass, ShallowPass, split_unet
from .models import Denoiser, as_denoiser
from .router import Router, integer_timestep
from .user_warnings import warn

COMPILE_MODES = ("auto", "none", "trace", "inductor")
PRECISIONS = ("fp32", "bf16")
EXACT_TOLERANCE = 1e-5  # a compiled graph whose output differs more from eager's is not used...
BF16_TOLERANCE = 5e-2  # ...or this much under bf16 autocast, where op order alone moves outputs by ~1e-2


def _is_diffusers_model(denoiser: nn.Module) -> bool:
    from diffusers import ModelMixin

    return isinstance(denoiser, Denoiser) and isinstance(denoiser.model, ModelMixin)


class CompiledExpert(nn.Module):
    """One denoiser run as a torch.jit.trace + freeze graph ("trace") or through torch.compile ("inductor").

    denoiser: called as denoiser(*tensors, with_variance=...): a Denoiser (x, t[, class_labels]) or one of the
    feature cache's passes (FullPass, ShallowPass), which take and return more tensors.
    A graph is built for each input shape, dtype, device and autocast state it meets, so any batch size works.
    Each new graph is checked against the eager model on its first input; one whose outputs differ by more than
    EXACT_TOLERANCE (BF16_TOLERANCE under autocast), or that fails to build, is replaced by the eager model, with a
    warning. Weights are frozen into a traced graph: build a new CompiledExpert after changing them. `paths`
    names what the graphs built so far run on ({"trace"}, {"none"} after a fallback, or both).
    """

    is_denoiser = True

    def __init__(self, denoiser: nn.Module, mode: str):
        super().__init__()
        self.denoiser = denoiser
        self.mode = mode
        self._graphs: dict = {}

    def forward(self, *inputs: torch.Tensor, with_variance: bool = False):
        x = inputs[0]
        key = (tuple((i.shape, i.dtype) for i in inputs), x.device, torch.is_autocast_enabled(x.device.type),
               with_variance)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._build(_Call(self.denoiser, with_variance), inputs)
        return graph(*inputs)

    @property
    def paths(self) -> set[str]:
        return {"none" if isinstance(graph, _Call) else self.mode for graph in self._graphs.values()} or {self.mode}

    @staticmethod
    def _trace(call: _Call, inputs: tuple[torch.Tensor, ...]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape branches: one graph per shape
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
            return torch.jit.freeze(torch.jit.trace(call, inputs, check_trace=False).eval())

    def _build(self, call: _Call, inputs: tuple[torch.Tensor, ...]):
        # No channels_last: it made DDIM-50 1.25x faster at batch 1 (not at 8, 0.94x at 64), but it changes
        # outputs by ~1e-6 per forward, which sampling amplifies past EXACT_TOLERANCE (bench/fast_path.py).
        x = inputs[0]
        tolerance = BF16_TOLERANCE if torch.is_autocast_enabled(x.device.type) else EXACT_TOLERANCE
        try:
            graph = self._trace(call, inputs) if self.mode == "trace" else torch.compile(call, dynamic=False)
            pairs = zip(_tensors(graph(*inputs)), _tensors(call(*inputs)), strict=True)
            diff = max(float((got.float() - want.float()).abs().max()) for got, want in pairs)
        except Exception as err:  # noqa: BLE001 - any model torch cannot compile still samples, eagerly
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        else:
            if diff <= tolerance:
                return graph
            reason = f"its output differs from the eager model's by {diff:.2g}"
        warn(f"--compile {self.mode} is not used for {type(self.denoiser).__name__} at input shape "
             f"{tuple(x.shape)} ({reason}); sampling it eagerly")
        return call


def _tensors(output) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


class _Call(nn.Module):
    """denoiser(*tensors, with_variance=...) with the flag fixed: what one graph traces."""

    def __init__(self, denoiser: nn.Module, with_variance: bool):
        super().__init__()
        self.denoiser, self.with_variance = denoiser, with_variance

    def forward(self, *inputs: torch.Tensor):
        return self.denoiser(*inputs, with_variance=self.with_variance)


class SamplingModel:
    """A denoiser or Router made ready for the sampling loop; `sample` builds one, or takes one built once.

    model: a diffusers UNet2DModel, any denoiser `model(x, t)`, or a tdcdiff Router.
    compile: "none" (eager), "trace" (torch.jit.trace + freeze per expert and input shape), "inductor"
        (torch.compile) or "auto": trace every expert that is a diffusers model, others eager (an arbitrary
        module may branch on its input's values, which a trace would freeze).
    precision: "fp32", or "bf16" for bf16 autocast (faster at large batches on CPUs with bf16 units, slower
        at batch 1; outputs change by about 1e-2, so never the default).
    `compile`/`precision` say what runs ("trace", "none", or e.g. "trace+none" when experts differ or a graph
    fell back to eager). Feature caching (`prepare_cache`, then a FeatureCache per trajectory) runs each expert's
    full and shallow passes (feature_cache.py) on the expert's path: both are traced as the expert would be.

    Measured (bench/fast_path.py, DDIM-50, one CPU thread; speedup over eager): digits-8 base, batch 1 / 64:
    trace 2.03x / 1.24x (images identical), inductor 1.44x / 1.27x (images up to ~1e-4 apart, 10-40x longer to
    build), trace + bf16 1.11x / 1.66x; a 4-expert bundle: trace 2.24x / 1.21x, inductor 1.48x / 1.22x, trace + bf16
    0.96x / 1.62x. Hence the default: trace, fp32.
    """

    @staticmethod
    def check_path(compile: str, precision: str) -> None:
        """Raise ValueError for a compile mode or precision that is not one of COMPILE_MODES, PRECISIONS."""
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose one of {COMPILE_MODES}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")

    def __init__(self, model: nn.Module, compile: str = "auto", precision: str = "fp32"):
        self.check_path(compile, precision)
        self.model = model
        self.router = model if isinstance(model, Router) else None
        self._denoisers = list(model.experts) if self.router is not None else [as_denoiser(model)]
        for i, expert in enumerate(self._denoisers if precision == "fp32" else ()):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in expert.parameters() if p.is_floating_point()})
            inner = expert.model if isinstance(expert, Denoiser) else expert
            if len(dtypes) > 1 and not getattr(inner, "_keep_in_fp32_modules", None):  # diffusers casts those itself
                which = f"expert {i}" if self.router is not None else "the model"
                raise ValueError(f"{which} holds weights of several dtypes ({', '.join(dtypes)}), which run only under "
                                 "autocast: sample with precision='bf16' (--precision bf16)")
        self._modes = [("trace" if _is_diffusers_model(e) else "none") if compile == "auto" else compile
                       for e in self._denoisers]
        self.experts = [self._compiled(e.eval(), mode) for e, mode in zip(self._denoisers, self._modes)]
        self.precision = precision
        self._cached_passes: dict[tuple[int, int], tuple[nn.Module, nn.Module]] = {}

    @staticmethod
    def _compiled(denoiser: nn.Module, mode: str) -> nn.Module:
        return denoiser if mode == "none" else CompiledExpert(denoiser, mode)

    @property
    def compile(self) -> str:
        runners = [*self.experts, *(p for passes in self._cached_passes.values() for p in passes)]
        paths = [p for e in runners for p in sorted(getattr(e, "paths", {"none"}), reverse=True)]
        return "+".join(dict.fromkeys(paths))

    def prepare_cache(self, depth: int) -> None:
        """Build (once) every expert's feature-cache passes at this branch depth, on the expert's sampling path.

        Raises ValueError, naming the expert, unless each is a diffusers UNet2DModel that DeepCacheUNet can split
        at this depth."""
        for index, denoiser in enumerate(self._denoisers):
            if (index, depth) in self._cached_passes:
                continue
            which = f"expert {index} of the router" if self.router is not None else "the model"
            core = split_unet(denoiser, depth, which)
            mode = self._modes[index]
            self._cached_passes[index, depth] = (self._compiled(FullPass(core), mode),
                                                 self._compiled(ShallowPass(core), mode))

    def __call__(self, x: torch.Tensor, t: int, class_labels: torch.Tensor | None = None, *,
                 with_variance: bool = False, cache: FeatureCache | None = None) -> torch.Tensor:
        """The model's prediction for the batch x (N, C, H, W), all at training timestep t; float32.

        t: an integer (an integral float or one-element tensor is taken); a fractional t is refused with
        router.FRACTIONAL's reason rather than truncated. class_labels: (N,) int64 for a class-conditional model.
        with_variance: keep a learned variance half. cache: a trajectory's feature cache (its depth prepared with
            `prepare_cache`): the step runs a full pass and stores its deep features, or the shallow branch on the
            stored ones (FeatureCache says which).
        """
        t = integer_timestep(t)
        index = self.router.route(t, x.shape[0]) if self.router is not None else 0
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        labels = () if class_labels is None else (class_labels,)
        if cache is None:
            return self._run(self.experts[index], (x, t_batch, *labels), with_variance)
        full, shallow = self._cached_passes[index, cache.depth]
        if cache.full_pass_due(index):
            prediction, deep = self._run(full, (x, t_batch, *labels), with_variance)
            cache.store(index, deep)
            return prediction
        return self._run(shallow, (x, t_batch, cache.reuse(t), *labels), with_variance)

    def _run(self, expert: nn.Module, inputs: tuple[torch.Tensor, ...], with_variance: bool):
        if self.precision == "fp32":
            return expert(*inputs, with_variance=with_variance)
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16):  # the passes return x's dtype
            return expert(*inputs, with_variance=with_variance)
