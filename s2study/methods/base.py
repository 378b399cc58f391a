"""The method template every detect-and-describe network fills in.

In the style of glue-factory's ``BaseModel``, a method *declares* what it is and fills in
three hooks; the base class does everything that is the same for every method::

    class Mine(Method):
        name = "mine"                  # registry key, `method.name` in configs (registered on
        label = "Mine"                 #   definition); row label of reports
        default_params = {             # every parameter with its comment and its check
            "dim": Param(128, "descriptor size", lambda v: v > 0, "a positive integer"),
            "mode": Param("fast", "what to run", choices=("fast", "exact")),
        }
        default_crop = 192             # training crop, learning rate and weight decay of
        default_lr = 1e-4              #   the method's paper (the trainer's defaults)
        default_weight_decay = 5e-4
        extract_options = {"multiscale": False}   # keyword options of extract, with defaults

        def _init(self): ...           # build the network from self.params
        def _forward(self, images): ...                      # -> DenseFeatures
        def _loss(self, out_a, out_b, flow, valid): ...      # -> {"total": ..., parts}
        def _extract(self, image, max_keypoints, multiscale): ...  # -> Features (torch)

        @classmethod
        def check_params(cls, params): ...   # optional: ranges across parameters

The base class:

- checks parameters, at config load (:meth:`Method.validate_params`, no network built) and at
  construction, the same way: unknown keys with a did-you-mean, the type each default implies
  (bool, int, number, string, list; a ``None`` default takes anything), each
  :class:`Param`'s own check, then the :meth:`Method.check_params` hook; every rejection is
  a :class:`ParamError` (a :class:`~s2study.errors.ConfigError`) naming ``method.key``;
- checks input shapes with one helper and one wording (:func:`check_shape`): images
  ``(B, 3, H, W)``, flow ``(B, H, W, 2)``, valid ``(B, H, W)``, one image ``(1, 3, H, W)``;
- runs extraction in eval mode without autograd (restoring the mode afterwards), checks
  the extraction options against :attr:`Method.extract_options` and fills in their
  defaults, and returns float32 :class:`~s2study.features.Features` of at most K keypoints;
- derives what the rest of s2study reads from the class: :attr:`Method.weights_names` (the
  resolver's weights whose ``method`` is this name), :meth:`Method.preset_paths` (its
  presets, ``<name>-*.yaml`` in ``s2study/presets/`` or beside its module), and
  :meth:`Method.from_pretrained` (a third-party weight file -> a built network).

Interfaces the hooks see:

- ``_forward(images)``: images (B, 3, H, W) float in [0, 1] -> :class:`DenseFeatures`
  (dense L2-normalised descriptors and detection score maps, possibly at a lower resolution
  than the input; ``stride`` says how much lower);
- ``_loss(out_a, out_b, flow, valid)``: the method's own loss ``L_f`` on a batch of pairs
  with dense ground truth A -> B (see :mod:`s2study.geometry`): flow (B, H, W, 2) absolute
  positions in B, valid (B, H, W) bool; returns named scalar parts with a ``"total"`` entry;
- ``_extract(image, max_keypoints, **options)``: keypoints, scores and descriptors of one
  image (1, 3, H, W), sorted by decreasing score.

The S2 joint loss (:mod:`s2study.s2loss`) wraps any method; methods know nothing about S2.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from s2study.errors import ConfigError
from s2study.features import Features, check_max_keypoints
from s2study.registry import Registry, unknown_name_message

METHODS: Registry[type[Method]] = Registry("method")

#: the presets shipped with the package (``s2study/presets/``)
PACKAGE_PRESETS = Path(__file__).resolve().parent.parent / "presets"


@dataclass
class DenseFeatures:
    """Network output for a batch.

    Attributes:
        descriptors: (B, D, h, w) L2-normalised along D.
        scores: (B, 1, h, w) detection scores (higher is better).
        extras: method-specific maps the loss needs (e.g. R2D2's ``repeatability`` and
            ``reliability``), each (B, C, h, w).
        stride: input pixels per feature-map pixel (1 for R2D2, 8 or 4 for D2-Net).
    """

    descriptors: Tensor
    scores: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    stride: int = 1

    def select(self, index: slice | Tensor) -> DenseFeatures:
        """The same features for a subset of the batch."""
        return DenseFeatures(
            self.descriptors[index],
            self.scores[index],
            {k: v[index] for k, v in self.extras.items()},
            self.stride,
        )

    def split(self, sizes: list[int]) -> list[DenseFeatures]:
        """Consecutive batch chunks of the given sizes.

        Unlike several :meth:`select` calls, the backward of a split writes each map's
        gradient once, instead of a zero-filled full-size gradient per chunk summed up.
        """
        maps = {"descriptors": self.descriptors, "scores": self.scores, **self.extras}
        chunks = {k: torch.split(v, sizes) for k, v in maps.items()}
        return [
            DenseFeatures(
                chunks["descriptors"][i],
                chunks["scores"][i],
                {k: chunks[k][i] for k in self.extras},
                self.stride,
            )
            for i in range(len(sizes))
        ]


# ----------------------------------------------------------------------------- parameters


class ParamError(ConfigError):
    """A rejected method parameter: ``str()`` is ``"<method>.<key>: <detail>"``.

    Attributes:
        key: the parameter; detail: what is wrong and what is allowed.
    """

    def __init__(self, method: str, key: str, detail: str) -> None:
        super().__init__(f"{method}.{key}: {detail}" if method else f"{key}: {detail}")
        self.method, self.key, self.detail = method, key, detail


def _value_kind(default: Any) -> tuple[tuple[type, ...], str] | None:
    """The value types a parameter with this default takes, and their name (None: any)."""
    if isinstance(default, bool):
        return (bool,), "true/false"
    if isinstance(default, int):
        return (int,), "an integer"
    if isinstance(default, float):
        return (int, float), "a number"
    if isinstance(default, str):
        return (str,), "a string"
    if isinstance(default, (list, tuple)):
        return (list, tuple), "a list"
    return None


@dataclass(frozen=True)
class Param:
    """One method parameter: its default, its comment, and what values it allows.

    The default's type is the parameter's type (a ``True``/``False`` default takes bools,
    an int default integers, a float default numbers, a string strings, a tuple or list
    lists; ``None`` anything). ``check`` (called with a value of that type) and ``choices``
    narrow it further; ``allowed`` says in words what is allowed, for the error message.

    Attributes:
        default: the value a config that leaves the parameter out gets.
        doc: what the parameter does (required: the comment every key carries).
        check: ``value -> bool``, True when the value is allowed.
        allowed: the allowed values in words (``"a positive integer"``).
        choices: the only allowed values (sets ``allowed`` to ``"one of a, b"``).
    """

    default: Any
    doc: str
    check: Callable[[Any], bool] | None = None
    allowed: str | None = None
    choices: tuple[Any, ...] | None = None

    def expected(self) -> str:
        """The allowed values in words."""
        if self.allowed:
            return self.allowed
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        kind = _value_kind(self.default)
        return kind[1] if kind else "an allowed value"

    def validate(self, method: str, key: str, value: Any) -> None:
        """Raise :class:`ParamError` unless ``value`` is allowed."""
        kind = _value_kind(self.default)
        if kind is not None:
            types = kind[0]
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise ParamError(method, key, f"{value!r} is not allowed; expected {self.expected()}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ParamError(method, key, f"{value!r} is not allowed; expected a finite number")
        ok = True
        if self.choices is not None:
            ok = value in self.choices
        if ok and self.check is not None:
            ok = bool(self.check(value))
        if not ok:
            raise ParamError(method, key, f"{value!r} is not allowed; expected {self.expected()}")


def check_shape(tensor: Any, spec: str, what: str, method: str = "", **dims: int) -> dict[str, int]:
    """Check ``tensor``'s shape against ``spec`` (e.g. ``"B,3,H,W"``), one wording for all.

    A spec entry is a number (that size) or a name; a name takes the size it first meets
    (or its value in ``dims``) and must keep it.

    Args:
        tensor: anything with a ``shape``.
        spec: comma-separated sizes and names.
        what: the tensor's name in the message (``"images"``, ``"flow"``).
        method: the method's name, prefixed to the message.
        dims: sizes the names must have (``B=2``).

    Returns:
        Every name's size (``dims`` included).

    Raises:
        ValueError: ``"r2d2: flow must have shape (B, H, W, 2) with B=2, got (1, 32, 32, 2)"``.
    """
    names = [s.strip() for s in spec.split(",")]
    shape = tuple(getattr(tensor, "shape", ()))
    bound = dict(dims)
    ok = len(shape) == len(names)
    for name, size in zip(names, shape) if ok else ():
        if name.isdigit():
            ok = size == int(name)
        elif name in bound:
            ok = size == bound[name]
        else:
            bound[name] = int(size)
        if not ok:
            break
    if not ok:
        given = ", ".join(f"{k}={v}" for k, v in dims.items())
        prefix = f"{method}: " if method else ""
        raise ValueError(
            f"{prefix}{what} must have shape ({', '.join(names)})"
            f"{' with ' + given if given else ''}, got {shape}"
        )
    return bound


class _WeightsNames:
    """``cls.weights_names``: the resolver's weights whose ``method`` is ``cls.name``."""

    def __get__(self, obj: Any, cls: type[Method]) -> tuple[str, ...]:
        from s2study.resolver import WEIGHTS

        return tuple(name for name, entry in WEIGHTS.items() if entry.method == cls.name)


# ----------------------------------------------------------------------------- the template


class Method(nn.Module):
    """The template of trainable methods (see the module docstring).

    A subclass that sets ``name`` registers itself in :data:`METHODS` when it is defined.
    """

    #: registry key (``method.name``); empty for abstract intermediate classes
    name: ClassVar[str] = ""
    #: row label in reports (default: the name)
    label: ClassVar[str] = ""
    #: the parameters: ``{key: Param(default, "comment", check)}`` as declared; after the
    #: class is defined, ``{key: default}`` (the declarations move to :attr:`param_specs`)
    default_params: ClassVar[dict[str, Any]] = {}
    #: the declarations of :attr:`default_params`
    param_specs: ClassVar[dict[str, Param]] = {}
    #: training crop size, learning rate and weight decay the method's paper uses
    default_crop: ClassVar[int] = 256
    default_lr: ClassVar[float] = 1e-4
    default_weight_decay: ClassVar[float] = 0.0
    #: keyword options of :meth:`extract` and their defaults
    extract_options: ClassVar[dict[str, Any]] = {}
    #: the resolver's weights names for this method (``r2d2_WASF_N16``, ``aliked-n16``...)
    weights_names = _WeightsNames()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "default_params" in own:
            specs: dict[str, Param] = {}
            for key, spec in own["default_params"].items():
                if not isinstance(spec, Param) or not spec.doc.strip():
                    raise TypeError(
                        f"{cls.__qualname__}.default_params[{key!r}]: declare each parameter as "
                        "Param(default, 'what it does', check), with its comment"
                    )
                specs[key] = spec
            cls.param_specs = specs
            cls.default_params = {key: spec.default for key, spec in specs.items()}
        if not isinstance(cls.extract_options, dict):
            raise TypeError(f"{cls.__qualname__}.extract_options must be a dict of name -> default")
        if own.get("name"):
            if "label" not in own:
                cls.label = cls.name
            METHODS.register(cls.name)(cls)

    # -- parameters -------------------------------------------------------------------------

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check ``params`` without building anything; return them merged over the defaults.

        Raises:
            ParamError: an unknown key (with a did-you-mean), a value of the wrong type, or
                one that its :class:`Param` or :meth:`check_params` refuses.
            ConfigError: ``params`` is not a mapping, or :meth:`check_params` refused a
                combination without naming one key.
        """
        if not isinstance(params, Mapping):
            raise ConfigError(f"{cls.name}: parameters must be a mapping of names to values, "
                              f"got {type(params).__name__}")
        known = sorted(cls.param_specs)
        for key in params:
            if key not in cls.param_specs:
                raise ParamError(
                    cls.name, str(key),
                    unknown_name_message(f"parameter of method {cls.name!r}", key, known),
                )
        for key, value in params.items():
            cls.param_specs[key].validate(cls.name, key, value)
        merged = {**cls.default_params, **params}
        try:
            cls.check_params(merged)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{cls.name}: {exc}") from None
        return merged

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> None:
        """Hook: ranges that involve several parameters (``params`` are complete and typed).

        Raise :class:`ParamError` (see :meth:`require`) or :class:`ConfigError`.
        """

    @classmethod
    def require(cls, ok: bool, params: Mapping[str, Any], key: str, allowed: str) -> None:
        """For :meth:`check_params`: raise ``ParamError`` on ``key`` unless ``ok``."""
        if not ok:
            raise ParamError(cls.name, key, f"{params[key]!r} is not allowed; expected {allowed}")

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params = type(self).validate_params(params)
        self._init()

    def _init(self) -> None:
        """Hook: build the network from ``self.params`` (validated, complete)."""

    # -- the three entry points -------------------------------------------------------------

    def forward(self, images: Tensor, **kwargs: Any) -> DenseFeatures:
        """Dense features of a batch: images (B, 3, H, W) float in [0, 1]."""
        check_shape(images, "B,3,H,W", "images", self.name)
        return self._forward(images, **kwargs)

    def loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:
        """``L_f``: flow (B, H, W, 2) A -> B at input resolution; valid (B, H, W) bool.

        Returns:
            Named scalar parts, ``"total"`` among them.
        """
        bsz = int(out_a.descriptors.shape[0])
        check_shape(out_b.descriptors, f"{bsz},D,h,w", "out_b.descriptors", self.name)
        dims = check_shape(flow, "B,H,W,2", "flow", self.name, B=bsz)
        check_shape(valid, "B,H,W", "valid", self.name, B=bsz, H=dims["H"], W=dims["W"])
        return self._loss(out_a, out_b, flow, valid)

    def extract(self, image: Tensor, max_keypoints: int, **options: Any) -> Features:
        """Keypoints of one image, in eval mode and without autograd.

        Args:
            image: (1, 3, H, W) RGB float in [0, 1] on the method's device.
            max_keypoints: K, the most keypoints returned (0: none, the shapes kept).
            options: options of :attr:`extract_options` (the others keep their defaults).

        Returns:
            :class:`~s2study.features.Features` of float32 tensors sorted by decreasing score:
            keypoints (N, 2) ``(x, y)`` in the input's pixels, scores (N,), descriptors (N, D)
            L2-normalised; N <= K.

        Raises:
            ValueError: the image is not (1, 3, H, W).
            ConfigError: K is not a non-negative integer, or an unknown option.
        """
        check_shape(image, "1,3,H,W", "image", self.name)
        zero = max_keypoints == 0 and not isinstance(max_keypoints, bool)  # 0: none
        k = 0 if zero else check_max_keypoints(max_keypoints)
        type(self).check_extract_options(options)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                found = self._extract(image, k, **{**self.extract_options, **options})
        finally:
            self.train(was_training)
        return Features(found.keypoints.float(), found.scores.float(), found.descriptors.float()).top(k)

    @classmethod
    def check_extract_options(cls, options: Mapping[str, Any]) -> None:
        """Raise :class:`ConfigError` for options that :attr:`extract_options` does not list."""
        unknown = [k for k in options if k not in cls.extract_options]
        if unknown:
            hints = [
                f"{k!r} (did you mean {h[0]!r}?)"
                for k in unknown
                if (h := difflib.get_close_matches(str(k), list(cls.extract_options), n=1))
            ]
            raise ConfigError(
                f"method {cls.name!r} does not take the extraction option(s) "
                f"{', '.join(map(str, unknown))}{'; ' + ', '.join(hints) if hints else ''}; "
                f"it accepts: {', '.join(cls.extract_options) or '(none)'}"
            )

    def _forward(self, images: Tensor, **kwargs: Any) -> DenseFeatures:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not implement _forward")

    def _loss(
        self, out_a: DenseFeatures, out_b: DenseFeatures, flow: Tensor, valid: Tensor
    ) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not implement _loss")

    def _extract(self, image: Tensor, max_keypoints: int, **options: Any) -> Features:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__} does not implement _extract")

    # -- third-party weights ----------------------------------------------------------------

    def load_pretrained(self, path: str | Path) -> None:
        """Initialise from a third-party weight file (official checkpoint, VGG16...)."""
        raise NotImplementedError(f"{self.name} has no pretrained-weight loader")

    @classmethod
    def pretrained_params(cls, path: str | Path) -> dict[str, Any]:
        """The architecture parameters a weight file implies (for the ones a config leaves
        unset, so ``method.weights: r2d2_WASF_N8_big`` alone builds the net that file needs)."""
        return {}

    @classmethod
    def default_weights(cls, params: Mapping[str, Any]) -> str | None:
        """The weights a config that names none starts from (a weights name or None:
        the network's own initialisation)."""
        return None

    @classmethod
    def recognizes(cls, obj: Any) -> bool:
        """Whether a loaded third-party weight file (``safe_torch_load``-ed) is this
        method's, for files that are neither s2study checkpoints nor named by the resolver."""
        return False

    @classmethod
    def from_pretrained(cls, path: str | Path, **params: Any) -> Method:
        """Build the network a third-party weight file describes and load it.

        Args:
            path: the weight file.
            params: other parameters (they override what the file implies).
        """
        method = cls(**{**cls.pretrained_params(path), **params})
        method.load_pretrained(path)
        return method

    # -- presets ----------------------------------------------------------------------------

    @classmethod
    def preset_paths(cls) -> dict[str, Path]:
        """This method's presets: ``<name>-*.yaml`` in ``s2study/presets/`` or beside the
        method's module (where a plug-in ships its own)."""
        folders = [PACKAGE_PRESETS, Path(inspect.getfile(cls)).resolve().parent]
        found: dict[str, Path] = {}
        for folder in folders:
            for path in sorted(folder.glob(f"{cls.name}-*.yaml")):
                found.setdefault(path.stem, path)
        return found
