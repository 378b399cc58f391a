"""The Method template: one class declares a method, and s2study reads everything from it.

The plug-in test writes a new method into a temporary module outside s2study (a tiny conv
net with a real loss), declares it through the documented plug-in route (an entry point of
group ``s2study.methods``) and ships one preset beside it; it then becomes configurable
(validated parameters with a did-you-mean), trainable (``s2study.train.train`` on real
RoadScene pairs), evaluable (``load_extractor`` on the checkpoint it wrote, then
``s2study.evaluate.evaluate``) and reportable (its label), with no file of s2study edited.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

import s2study
from s2study.config.load import load_train_config, preset_names, train_config_from_dict
from s2study.errors import ConfigError
from s2study.methods import METHODS, DenseFeatures, Method, Param, check_shape, load_methods

REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A plug-in method for s2study: a two-layer conv net with a hinge descriptor loss."""

import torch
import torch.nn.functional as F
from torch import nn

from s2study.features import Features
from s2study.methods import DenseFeatures, Method, Param


class TinyX(Method):
    name = "tinyx"
    label = "TinyX"
    default_crop = 64
    default_lr = 1e-3
    default_weight_decay = 0.0
    extract_options = {"nms": True}
    default_params = {
        "dim": Param(16, "descriptor size", lambda v: v > 0, "a positive integer"),
        "margin": Param(0.5, "hinge margin of the descriptor loss", lambda v: 0 < v < 2,
                        "a number in (0, 2)"),
    }

    def _init(self):
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, self.params["dim"] + 1, 3, padding=1)
        )

    def _forward(self, images):
        x = self.body(images)
        return DenseFeatures(F.normalize(x[:, :-1], dim=1), torch.sigmoid(x[:, -1:]), stride=1)

    def _loss(self, out_a, out_b, flow, valid):
        h, w = flow.shape[1:3]
        grid = torch.stack([flow[..., 0] * 2 / (w - 1) - 1, flow[..., 1] * 2 / (h - 1) - 1], -1)
        desc_b = F.grid_sample(out_b.descriptors, grid, align_corners=True)
        score_b = F.grid_sample(out_b.scores, grid, align_corners=True)
        pos = (out_a.descriptors * desc_b).sum(1)
        neg = (out_a.descriptors * desc_b.roll(7, dims=-1)).sum(1)
        m = valid.float()
        n = m.sum().clamp_min(1)
        desc = (F.relu(self.params["margin"] - pos + neg) * m).sum() / n
        det = ((out_a.scores - score_b)[:, 0].square() * m).sum() / n
        return {"total": desc + det, "desc": desc, "det": det}

    def _extract(self, image, max_keypoints, nms=True):
        out = self(image)
        s = out.scores[0, 0]
        if nms:
            s = torch.where(s == F.max_pool2d(s[None, None], 3, 1, 1)[0, 0], s, torch.full_like(s, -1))
        top = s.flatten().topk(min(max_keypoints, s.numel()))
        idx = top.indices[top.values >= 0]
        xy = torch.stack([idx % s.shape[1], idx // s.shape[1]], 1).float()
        desc = out.descriptors[0].flatten(1).t()[idx]
        return Features(xy, s.flatten()[idx], desc)
'''

PRESET = """\
# TinyX on RoadScene: the plug-in's own preset, found beside its module
data: {dataset: roadscene}
method: {name: tinyx}
lambda_ssl: 0.4
epochs: 1
batch_size: 1
val_k: 64
"""


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    """The plug-in installed the way a user's package is: a module, one preset beside it,
    and a distribution declaring the entry point (here a bare ``.dist-info`` on sys.path)."""
    from s2study import methods as methods_pkg

    root = tmp_path_factory.mktemp("plugin")
    (root / "s2study_plugin_x.py").write_text(textwrap.dedent(PLUGIN))
    (root / "tinyx-roadscene.yaml").write_text(PRESET)
    info = root / "s2study_plugin_x-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: s2study-plugin-x\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[s2study.methods]\ntinyx = s2study_plugin_x\n")
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(root))
    yield root
    mp.undo()
    METHODS.remove("tinyx")
    methods_pkg._plugins_tried.discard("tinyx = s2study_plugin_x")
    sys.modules.pop("s2study_plugin_x", None)


def test_the_plugin_is_found_through_its_entry_point(plugin):
    cls = load_methods().get("tinyx")
    assert cls.__module__ == "s2study_plugin_x" and cls.label == "TinyX"
    assert cls.default_params == {"dim": 16, "margin": 0.5}
    assert cls.param_specs["margin"].doc == "hinge margin of the descriptor loss"
    assert "tinyx-roadscene" in preset_names()
    assert cls.preset_paths() == {"tinyx-roadscene": plugin / "tinyx-roadscene.yaml"}
    # nothing in s2study names it: the module, its preset and its entry point are all it takes
    mentions = [p for p in (REPO / "s2study").rglob("*") if p.is_file() and p.suffix in (".py", ".yaml")
                and "tinyx" in p.read_text(errors="ignore")]
    assert mentions == []


def test_the_plugin_is_configurable(plugin):
    cfg = load_train_config("tinyx-roadscene", ["method.params.dim=8"])
    assert cfg.method.name == "tinyx" and cfg.method.params == {"dim": 8}
    with pytest.raises(ConfigError, match=r"cfg.yaml: method.params.dimm: unknown parameter of method "
                                          r"'tinyx' 'dimm' \(did you mean 'dim'\?\); known: dim, margin"):
        train_config_from_dict({"method": {"name": "tinyx", "params": {"dimm": 8}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"method.params.margin: 3.0 is not allowed; expected a number in \(0, 2\)"):
        train_config_from_dict({"method": {"name": "tinyx", "params": {"margin": 3.0}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"method.params.dim: 'x' is not allowed; expected a positive integer"):
        train_config_from_dict({"method": {"name": "tinyx", "params": {"dim": "x"}}}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"method.name: unknown method 'tinyy' \(did you mean 'tinyx'\?\)"):
        train_config_from_dict({"method": {"name": "tinyy"}}, "cfg.yaml")


def test_the_plugin_trains_evaluates_and_reports(plugin, roadscene, tmp_path):
    from s2study.data.datasets import open_dataset
    from s2study.evaluate import evaluate
    from s2study.report import method_label, paper_tables
    from s2study.train import method_defaults, train

    cfg = load_train_config(
        "tinyx-roadscene",
        [f"data.root={roadscene}", "data.max_train_pairs=4", "data.max_val_pairs=2",
         "data.val_max_size=160", "steps_per_epoch=2", "device=cpu", "precision=fp32"],
    )
    assert method_defaults(cfg) == (64, 1e-3, 0.0)  # the class's crop, lr and weight decay
    result = train(cfg, out_dir=tmp_path / "run", progress=False)
    assert result.epochs_done == 1 and len(result.history) == 1
    epoch = result.history[0]
    assert {"loss/total", "loss/sl/desc", "loss/ssl_vis/det", "val_ncm"} <= set(epoch)
    assert torch.isfinite(torch.tensor(epoch["loss/total"]))

    extractor = s2study.load_extractor(result.last_checkpoint)
    assert extractor.name == "tinyx-last"
    with pytest.raises(ConfigError, match=r"does not take the extraction option\(s\) nmss; 'nmss' "
                                          r"\(did you mean 'nms'\?\); it accepts: nms"):
        s2study.load_extractor(result.last_checkpoint, nmss=False)
    val = open_dataset(cfg.data, cfg.data.val_split)
    evaluated = evaluate([extractor], val, ks=(64,), progress=False)
    mean = evaluated.means[extractor.name][64]
    assert mean.nc > 0 and 0 <= mean.cmr <= 100

    assert method_label("tinyx", 0.0) == "TinyX" and method_label("tinyx", 0.4) == "TinyX+SSL (λ=0.4)"
    table = paper_tables([{"name": "t0", "method": "tinyx", "dataset": "roadscene", "lambda_ssl": 0.4,
                           "metrics": {"eval/nc_k64": mean.nc, "eval/ncm_3px_k64": mean.ncm,
                                       "eval/cmr_3px_k64": mean.cmr}}])
    assert "TinyX+SSL (λ=0.4)" in table


# ------------------------------------------------------------------ the template itself


def test_every_module_of_the_package_registers_its_method():
    methods = load_methods()
    assert {"r2d2", "d2net", "aliked"} <= set(methods.names())
    for name, cls in methods.items():
        assert cls.name == name and cls.label
        for key, spec in cls.param_specs.items():
            assert spec.doc.strip(), f"{name}.{key} has no comment"
            assert cls.default_params[key] == spec.default


def test_a_parameter_without_its_comment_is_refused_at_definition():
    with pytest.raises(TypeError, match=r"default_params\['dim'\]: declare each parameter as Param"):
        class NoDoc(Method):
            default_params = {"dim": 16}  # noqa: RUF012
    with pytest.raises(TypeError, match="with its comment"):
        class EmptyDoc(Method):
            default_params = {"dim": Param(16, " ")}  # noqa: RUF012


def test_classes_declare_what_the_rest_reads():
    from s2study.report import method_labels

    methods = load_methods()
    r2d2, d2net, aliked = (methods.get(n) for n in ("r2d2", "d2net", "aliked"))
    assert (r2d2.default_crop, r2d2.default_lr, r2d2.default_weight_decay) == (192, 1e-4, 5e-4)
    assert (d2net.default_crop, d2net.default_lr, d2net.default_weight_decay) == (256, 1e-4, 1e-5)
    assert r2d2.weights_names == ("r2d2_WASF_N16", "r2d2_WAF_N16", "r2d2_WASF_N8_big", "faster2d2_WASF_N16")
    assert aliked.weights_names == ("aliked-t16", "aliked-n16", "aliked-n16rot", "aliked-n32")
    assert d2net.weights_names == ()
    assert r2d2.extract_options == {"multiscale": False} and aliked.extract_options == {}
    assert {"r2d2": "R2D2", "d2net": "D2-Net", "aliked": "ALIKED"}.items() <= method_labels().items()
    assert set(r2d2.preset_paths()) == {"r2d2-roadscene", "r2d2-rgbnir"}
    assert set(aliked.preset_paths()) == {"aliked-roadscene", "aliked-rgbnir"}


def test_parameters_are_checked_the_same_at_config_load_and_construction():
    r2d2 = load_methods().get("r2d2")
    for bad, message in (
        ({"dim": 1.5}, "r2d2.dim: 1.5 is not allowed; expected a positive integer"),
        ({"relu22": 1}, "r2d2.relu22: 1 is not allowed; expected true/false"),
        ({"ap_base": float("nan")}, "r2d2.ap_base: nan is not allowed; expected a finite number"),
        ({"neg_d": 9}, "r2d2.neg_d: 9 is not allowed; expected an integer with pos_d < neg_d <= ngh"),
    ):
        with pytest.raises(ConfigError) as at_load:
            r2d2.validate_params(bad)
        with pytest.raises(ConfigError) as at_build:
            r2d2(**bad)
        assert str(at_load.value) == str(at_build.value) == message
    assert r2d2.validate_params({"dim": 64})["dim"] == 64


def test_one_shape_check_with_one_wording():
    assert check_shape(torch.zeros(2, 3, 8, 9), "B,3,H,W", "images") == {"B": 2, "H": 8, "W": 9}
    with pytest.raises(ValueError, match=r"^r2d2: images must have shape \(B, 3, H, W\), got \(2, 1, 8, 8\)$"):
        check_shape(torch.zeros(2, 1, 8, 8), "B,3,H,W", "images", "r2d2")
    with pytest.raises(ValueError, match=r"^flow must have shape \(B, H, W, 2\) with B=2, got \(1, 4, 4, 2\)$"):
        check_shape(torch.zeros(1, 4, 4, 2), "B,H,W,2", "flow", B=2)
    net = load_methods().get("d2net")()
    for call, what in (
        (lambda: net(torch.zeros(1, 3, 16)), r"d2net: images must have shape \(B, 3, H, W\)"),
        (lambda: net.extract(torch.zeros(2, 3, 16, 16), 5), r"d2net: image must have shape \(1, 3, H, W\)"),
    ):
        with pytest.raises(ValueError, match=what):
            call()
    out = net(torch.rand(2, 3, 32, 32))
    flow, valid = torch.zeros(2, 32, 32, 2), torch.ones(2, 31, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"d2net: valid must have shape \(B, H, W\) with B=2, H=32, W=32"):
        net.loss(out, out, flow, valid)


def test_extraction_runs_in_eval_mode_without_autograd_and_restores_the_mode():
    seen = {}

    class Probe(Method):
        default_params = {"dim": Param(4, "descriptor size")}  # noqa: RUF012
        extract_options = {"flag": 1}  # noqa: RUF012

        def _init(self):
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def _forward(self, images):
            x = self.conv(images)
            return DenseFeatures(x, x[:, :1])

        def _extract(self, image, max_keypoints, flag):
            seen.update(training=self.training, grad=torch.is_grad_enabled(), flag=flag)
            n = 5
            return s2study.features.Features(torch.zeros(n, 2, dtype=torch.float64),
                                             torch.arange(n, 0, -1.0), torch.ones(n, 4))

    net = Probe().train()
    feats = net.extract(torch.rand(1, 3, 8, 8), 3)
    assert seen == {"training": False, "grad": False, "flag": 1} and net.training
    assert len(feats) == 3 and feats.keypoints.dtype == torch.float32
    net.extract(torch.rand(1, 3, 8, 8), 3, flag=2)
    assert seen["flag"] == 2
    with pytest.raises(ConfigError, match=r"'flg' \(did you mean 'flag'\?\); it accepts: flag"):
        net.extract(torch.rand(1, 3, 8, 8), 3, flg=2)
    assert "" not in METHODS  # an unnamed class is a template, not a method
