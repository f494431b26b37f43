"""Property-based fuzzing (hypothesis) of what medfed reads from outside: config files and
`--set` values, the partitioners' arguments, image files, and the sites' training and evaluation
replies with the metric records the report decodes.

Each property says what must hold for every input, not only that nothing crashed: a config either
loads and validates into one that can run (finite numbers, usable seeds, a non-empty comparison
plan, unchanged through JSON) or is refused with a MedfedError; a partition covers every example
exactly once; a damaged image raises ImageReadError and nothing else, and a good one decodes to
its own pixels; a reply is either aggregated or rejected with a one-line reason, and what is
aggregated stays within what the accepted sites sent.

Runs are derandomized (the same examples every time, so CI is deterministic) and bounded.
"""

from __future__ import annotations

import gc
import io
import json
import math
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from pydicom.data import get_testdata_file

from flwr.app import (
    Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from conftest import evaluation_record
from imagefiles import write_dicom
from medfed.common.config import Config
from medfed.common.config_checks import comparison_plan, validate
from medfed.common.config_loading import from_dict, load_yaml, parse_assignment, set_value
from medfed.common.decoded_image import ImageReadError
from medfed.common.errors import MedfedError
from medfed.common.imaging import is_dicom, read_image
from medfed.common.messages import (
    EVALUATED_SPLITS, EVALUATION, WEIGHT_KEY, evaluation_metrics, round_config, split_metrics,
)
from medfed.common.metrics import SCALARS
from medfed.server.report import build_report, render_markdown
from medfed.common.schedule import FINETUNE, HEAD, PlateauSchedule, Stages
from medfed.server.aggregation import make_flower_strategy
from medfed.server.sampling import site_name
from medfed.server.strategy import MedfedStrategy
from medfed.simulations.partition import partition


# Fuzzed inputs make numpy overflow and pydicom warn about damaged files by design.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """Flower calls gc.collect() for every ArrayRecord it converts (Bulyan, Krum); with torch and
    hypothesis loaded that is ~0.2 s a call. Objects alive now are left out of those collections."""
    gc.freeze()
    yield
    gc.unfreeze()


def fuzz(max_examples: int):
    """Bounded, derandomized, no example database written into the checkout."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# === config: YAML files and --set values ==========================================================

def _fields(section) -> dict[str, object]:
    return {f: getattr(section, f) for f in section.__dataclass_fields__}


SECTIONS = {name: sorted(_fields(value)) for name, value in _fields(Config()).items()
            if hasattr(value, "__dataclass_fields__")}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys] + ["seed", "out"]

# What people type, and what breaks parsers: YAML 1.1 scalars of every type, impossible dates,
# explicit tags with bad values, special floats, huge numbers, nesting.
SCALAR_TEXT = st.sampled_from([
    "1", "0", "-1", "2", "3", "10", "40", "64", "224", "0.5", "1e-4", "1.0e-4", "1e400", "1.0e400",
    "-0.0", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1_000", "1:30", "99999999999999999999999",
    "4294967296", "18446744073709551616", "yes", "no", "on", "off", "true", "null", "~", "''",
    "none", "all", "auto", "cpu", "fedavg", "krum", "bulyan", "dirichlet", "natural", "clahe",
    "pneumoniamnist", "chestmnist", "sign-flip", "federated,local", "all,", ",", "0,1,1", "-1,2",
    "0.5,1.0", "0,2", "nan", "1,nan", "2024-01-31", "2024-13-45", "2024-02-30",
    "2001-12-14t21:59:43.10-05:00", "2001-01-01 10:00:00 +99:00", "!!int x", "!!int ''",
    "!!float x", "!!bool x", "!!timestamp x", "!!binary ###", "!!binary a", "!!str 5",
    "!!python/object:os.system x", "[a, b]", "[normal, pneumonia]", "[1, [2]]", "{a: 1}", "[]",
    "{}", "&a [*a]", "\"\\x00\"", "'quoted: text'", "[" * 300, "{" * 300 + "}" * 300,
])


def _value(config: Config, key: str):
    section, _, name = key.rpartition(".")
    return getattr(getattr(config, section) if section else config, name)


def _default(key: str):
    return _value(Config(), key)


def _plausible(key: str) -> list[str]:
    """Values a person might well set `key` to: its default and others of its type."""
    default = _default(key)
    if isinstance(default, bool):
        return ["true", "false"]
    if isinstance(default, int):
        return [str(default), "0", "1", "2", "5", "40", "-1", "4294967296"]
    if isinstance(default, float):
        return [repr(default), "0.5", "1e-4", "0.2", "2", ".inf", "1e400", ".nan", "-1"]
    return ["null", "''", "x", "1"] if default is None else [str(default), str(default) + ","]


def value_for(key: str) -> st.SearchStrategy:
    """Mostly a plausible value (so that many configs validate and are checked), else anything."""
    return st.one_of(st.sampled_from(_plausible(key)), st.sampled_from(_plausible(key)),
                     st.sampled_from(_plausible(key)), SCALAR_TEXT)


@st.composite
def yaml_documents(draw) -> str:
    """A config-like YAML document: real and made-up sections and keys, odd values, odd layout."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, "seed", "out"]) if draw(st.integers(0, 5))
                       else st.sampled_from(["bogus", "Data", "1", "? [a]"]))
        if section in SECTIONS and draw(st.booleans()):
            lines.append(f"{section}:")
            for _ in range(draw(st.integers(0, 4))):
                key = draw(st.sampled_from(SECTIONS[section]) if draw(st.integers(0, 7))
                           else st.sampled_from(["nope", "a.b", "1", ""]))
                value = value_for(f"{section}.{key}") if key in SECTIONS[section] else SCALAR_TEXT
                lines.append(f"  {key}: {draw(value)}")
        else:
            lines.append(f"{section}: {draw(value_for(section) if section in KEYS else SCALAR_TEXT)}")
    text = "\n".join(lines)
    if draw(st.integers(0, 3)) == 0:
        # Damage it: splice random text in somewhere.
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(string.printable + "\u00e9\u2028\t", max_size=20)) + text[at:]
    return text


def assert_runnable(config: Config) -> None:
    """What a validated config promises to everything downstream."""
    for section in [config, *(getattr(config, name) for name in SECTIONS)]:
        for name, value in _fields(section).items():
            if isinstance(value, float):
                assert math.isfinite(value), f"{name}={value!r} passed validation"
    modes, seeds, fractions = comparison_plan(config)
    assert modes and seeds and fractions
    assert len(set(modes)) == len(modes) and len(set(seeds)) == len(seeds)
    for seed in seeds:
        # Every seeded generator medfed uses must take it, including a site's derived seed.
        np.random.default_rng(seed)
        torch.Generator().manual_seed(seed * 100_003 + 10_000 * 1_009 + 999)
    # A validated config travels to every site as JSON and must arrive unchanged.
    assert Config.from_json(config.to_json()) == config


def load_or_refuse(load) -> Config | None:
    """Run `load`; a MedfedError is a refusal (one line), anything else propagates as a bug."""
    try:
        config = validate(load())
    except MedfedError as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        event("refused")
        return None
    assert_runnable(config)
    event("validated")
    return config


@fuzz(250)
@given(text=yaml_documents())
def test_any_yaml_config_file_loads_and_validates_or_is_refused(text, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(text, encoding="utf-8")
    load_or_refuse(lambda: load_yaml(path))


@fuzz(60)
@given(data=st.binary(max_size=200))
def test_any_bytes_as_a_config_file_are_loaded_or_refused(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(data)
    load_or_refuse(lambda: load_yaml(path))


@fuzz(150)
@example(assignments=["train.lr=.inf"])  # each of these once passed validation or raised
@example(assignments=["partition.alpha=1e400"])
@example(assignments=["federation.round_timeout=.inf"])
@example(assignments=["seed=-1"])
@example(assignments=["seed=18446744073709551616"])
@example(assignments=["evidence.seeds=,"])
@example(assignments=["evidence.seeds=0,1,1"])
@example(assignments=["evidence.train_fractions=,"])
@example(assignments=["evidence.compare=local,local"])
@example(assignments=["out=2024-13-45"])
@example(assignments=["data.path=!!int x"])
@example(assignments=["seed=" + "[" * 3000])
@given(assignments=st.lists(
    st.one_of(
        st.sampled_from(KEYS).flatmap(lambda key: value_for(key).map(lambda v: f"{key}={v}")),
        st.sampled_from(KEYS).flatmap(lambda key: value_for(key).map(lambda v: f"{key}={v}")),
        st.sampled_from(KEYS).flatmap(lambda key: value_for(key).map(lambda v: f"{key}={v}")),
        st.text(string.printable, max_size=30),
    ),
    min_size=1, max_size=3,
))
def test_any_set_assignments_apply_and_validate_or_are_refused(assignments):
    def load() -> Config:
        config = Config()
        for text in assignments:
            key, value = parse_assignment(text)
            set_value(config, key, value)
        return config

    config = load_or_refuse(load)
    if config is not None:
        # The last assignment of a key wins, and holds what that value alone would set.
        key, value = parse_assignment(assignments[-1])
        alone = Config()
        set_value(alone, key, value)
        assert _value(config, key) == _value(alone, key)


@fuzz(100)
@given(raw=st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from([*SECTIONS, *KEYS, "seed", "x"]), children, max_size=4),
    ),
    max_leaves=12,
))
def test_any_parsed_mapping_builds_a_config_or_is_refused(raw):
    load_or_refuse(lambda: from_dict(raw))


# === partitioners ==================================================================================

SCHEMES = ("iid", "dirichlet", "quantity", "pathological")


@pytest.mark.parametrize("scheme", [*SCHEMES, "shards"])
@fuzz(70)
# Once a ValueError from numpy (no sites), and every example silently on the last site (alpha inf).
@example(labels=np.array([0, 1, 1]), sites=0, alpha=0.5, labels_per_site=1, seed=0, min_size=0)
@example(labels=np.arange(40) % 2, sites=4, alpha=math.inf, labels_per_site=1, seed=0, min_size=0)
@given(
    labels=hnp.arrays(np.int64, st.integers(0, 400), elements=st.integers(-2, 6)),
    sites=st.one_of(st.integers(1, 12), st.integers(1, 12), st.integers(-1, 0)),
    alpha=st.one_of(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3), st.sampled_from(
        [0.0, -1.0, 1e-300, 1e-8, 1e300, math.inf, math.nan])),
    labels_per_site=st.integers(0, 8),
    seed=st.integers(0, 2**32 - 1),
    min_size=st.integers(0, 60),
)
def test_a_partition_covers_every_example_exactly_once_or_is_refused(
        labels, scheme, sites, alpha, labels_per_site, seed, min_size):
    def draw():
        return partition(labels, scheme=scheme, sites=sites, alpha=alpha,
                         labels_per_site=labels_per_site, seed=seed, min_size=min_size, attempts=5)

    try:
        parts = draw()
    except MedfedError as exc:
        assert str(exc) and "\n" not in str(exc)
        event("refused")
        return
    event(f"partitioned ({scheme})")
    assert scheme in SCHEMES
    assert len(parts) == sites
    for part in parts:
        assert part.dtype.kind == "i" and part.ndim == 1
        assert np.all(np.diff(part) > 0)  # sorted, no index twice within a site
    joined = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))
    # Seeded: the same arguments give the same partition.
    assert all(np.array_equal(a, b) for a, b in zip(parts, draw()))
    if scheme == "iid" and len(labels) >= sites * min_size:
        # An even split meets any minimum that the pool allows.
        assert min(map(len, parts)) >= min_size
    if scheme == "pathological":
        for part in parts:
            assert len(np.unique(labels[part])) <= labels_per_site
    if scheme in ("dirichlet", "quantity") and sites >= 2 and len(labels) >= 10 * sites and alpha >= 1e6:
        # A huge alpha means near-equal shares, never one site holding everything.
        assert max(map(len, parts)) < len(labels)


# === image decoding ===============================================================================

SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", "", ".PNG", ".bin")
SIGNATURES = (b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\x00" * 128 + b"DICM")
SAMPLES = ("MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
           "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_small_odd_jpeg.dcm", "SC_rgb_rle.dcm",
           "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "JPEGLSNearLossless_08.dcm",
           "SC_rgb_small_odd.dcm", "SC_rgb_rle_2frame.dcm", "JPEG2000.dcm")


def _encoded(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _corpus() -> list[tuple[str, bytes]]:
    """Valid files of every kind read_image handles: (suffix, bytes)."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    rgb = rng.integers(0, 256, (7, 10, 3), dtype=np.uint8)
    files = [
        (".png", _encoded(gray, "PNG")), (".png", _encoded(rgb, "PNG")),
        (".png", _encoded(rng.integers(0, 65536, (6, 5), dtype=np.uint16), "PNG")),
        (".png", _palette_png(rgb)),
        (".jpg", _encoded(gray, "JPEG", quality=90)), (".jpg", _encoded(rgb, "JPEG", quality=90)),
    ]
    for name in SAMPLES:
        path = get_testdata_file(name, download=False)
        if path is not None:
            files.append((".dcm", Path(path).read_bytes()))
    return files


def _palette_png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buffer, format="PNG")
    return buffer.getvalue()


CORPUS = _corpus()


def assert_decoded_or_refused(path: Path) -> None:
    """read_image's contract: ImageReadError with a one-line reason, or well-formed pixels."""
    assert is_dicom(path) in (True, False)
    try:
        decoded = read_image(path)
    except ImageReadError as exc:
        # One printable line: no newline, and none of the file's raw bytes.
        assert str(exc) and str(exc).isprintable(), repr(str(exc))
        event("ImageReadError")
        return
    event("decoded")
    pixels, info = decoded.pixels, decoded.info
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8
    assert pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)
    assert pixels.size > 0
    assert (info["height"], info["width"]) == pixels.shape[:2]
    assert info["channels"] == (1 if pixels.ndim == 2 else 3)
    assert info["format"] in ("png", "jpeg", "dicom")


@fuzz(200)
@given(prefix=st.sampled_from(SIGNATURES), body=st.binary(max_size=600),
       suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_raise_image_read_error_and_nothing_else(prefix, body, suffix,
                                                               tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / f"file{suffix}"
    path.write_bytes(prefix + body)
    assert_decoded_or_refused(path)


@st.composite
def damaged_files(draw) -> tuple[str, bytes]:
    """A valid file with random damage: flipped, overwritten, inserted or deleted bytes, a cut."""
    suffix, data = draw(st.sampled_from(CORPUS))
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[at:at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        else:
            del data[at:]
    suffix = draw(st.sampled_from([suffix, suffix, *SUFFIXES]))
    return suffix, bytes(data)


@fuzz(600)
@given(damaged=damaged_files())
def test_damaged_image_files_raise_image_read_error_and_nothing_else(damaged, tmp_path_factory):
    suffix, data = damaged
    path = tmp_path_factory.mktemp("img") / f"file{suffix}"
    path.write_bytes(data)
    assert_decoded_or_refused(path)


@pytest.mark.slow
@fuzz(20_000)
@given(damaged=damaged_files())
def test_damaged_image_files_at_length(damaged, tmp_path_factory):
    """The same property over 20,000 damaged files (a few minutes; pytest -m slow)."""
    test_damaged_image_files_raise_image_read_error_and_nothing_else.hypothesis.inner_test(
        damaged, tmp_path_factory)


def test_the_undamaged_corpus_decodes(tmp_path):
    """The seeds of the damage above are good files, so the damage is what gets refused."""
    assert len(CORPUS) >= 10
    for i, (suffix, data) in enumerate(CORPUS):
        path = tmp_path / f"file{i}{suffix}"
        path.write_bytes(data)
        assert read_image(path).pixels.size


@fuzz(60)
@given(pixels=hnp.arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)).flatmap(
    lambda hw: st.sampled_from([hw, (*hw, 3)]))),
       fmt=st.sampled_from(["png", "jpeg", "dicom"]))
def test_a_small_valid_image_round_trips(pixels, fmt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    if fmt == "dicom":
        assume(pixels.ndim == 2)
        path = write_dicom(folder / "image.dcm", pixels)
    else:
        path = folder / f"image.{'png' if fmt == 'png' else 'jpg'}"
        path.write_bytes(_encoded(pixels, fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {})))
    decoded = read_image(path)
    assert decoded.pixels.shape == pixels.shape
    assert decoded.info["format"] == fmt
    assert decoded.info["bits"] == 8
    if fmt != "jpeg":  # lossless: the very pixels
        np.testing.assert_array_equal(decoded.pixels, pixels)


# === the server's reading of replies and metric records ===========================================

# A tiny "model": one parameter and BatchNorm statistics, float32 and int64 as a real one.
GLOBAL = {
    "conv.weight": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    "bn.running_mean": np.array([0.1, -0.2, 0.3], dtype=np.float32),
    "bn.running_var": np.array([1.0, 0.5, 2.0], dtype=np.float32),
    "bn.num_batches_tracked": np.array(7, dtype=np.int64),
}
STATISTICS = ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
CLASSES = ["normal", "pneumonia", "other"]
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg", "fedadam", "krum", "multikrum",
              "bulyan")
MAX_EXAMPLES = 1000


def tiny_strategy(name: str, *, sites: int, registry: dict[int, str] | None,
                  rounds: int = 10) -> MedfedStrategy:
    """Every round fine-tunes (no head stage): all of GLOBAL travels."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    config = Config()
    config.federation.strategy = name
    return MedfedStrategy(
        make_flower_strategy(config, num_sites=sites),
        statistic_keys=STATISTICS,
        schedule=PlateauSchedule(lr=config.train.lr, federation=config.federation),
        stages=Stages(head_rounds=0, head_lr=config.train.head_lr, lr=config.train.lr),
        stage_keys={HEAD: ["conv.weight"], FINETUNE: list(GLOBAL)},
        rounds=rounds,
        selection="loss",
        round_config=round_config(config, classes=CLASSES, study="test"),
        expected_sites=[f"site-{i}" for i in range(sites)], min_sites=1, wait_s=0.0,
        norm_factor=config.federation.norm_factor, max_examples=MAX_EXAMPLES, registry=registry,
    )


NUMBERS = st.one_of(
    st.integers(-(2**63), 2**64 - 1), st.just(10**400), st.floats(),
    st.lists(st.integers(-5, 5), max_size=3), st.lists(st.floats(), min_size=1, max_size=3),
)
DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "bool", "complex64")
ARRAY_DAMAGE = ("nan", "inf", "huge", "drop", "extra", "dtype", "shape", "bytes", "stype", "empty")
RECORD_DAMAGE = ("n", "loss", "drop metric", "extra metric", "more arrays", "no arrays",
                 "no metrics", "more metrics", "evaluation", "no evaluation")


def _honest(draw) -> bool:
    """Most replies are honest, so that what is aggregated gets checked, not only what is refused."""
    return draw(st.integers(0, 9)) < 7


def _damage_array(draw, arrays: dict, kind: str) -> None:
    key = draw(st.sampled_from(sorted(GLOBAL)))
    value = np.array(arrays.get(key, GLOBAL[key]))
    if kind in ("nan", "inf", "huge") and value.dtype.kind == "f":
        if kind == "huge":  # finite, but near the end of float32's range
            value[...] = draw(st.sampled_from([1e4, 1e30, 3.4e38, -3.4e38]))
        else:
            value.flat[draw(st.integers(0, value.size - 1))] = (
                np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf])))
        arrays[key] = value
    elif kind == "drop":
        arrays.pop(key, None)
    elif kind == "extra":
        arrays[draw(st.sampled_from(["junk", "conv.bias", ""]))] = value
    elif kind == "dtype":
        arrays[key] = value.astype(draw(st.sampled_from(DTYPES)))
    elif kind == "shape":
        arrays[key] = draw(st.sampled_from([value.reshape(-1), value.reshape(1, -1),
                                            np.zeros((1,), value.dtype), value[..., None]]))
    elif kind == "bytes":
        arrays[key] = Array(dtype=str(value.dtype), shape=tuple(value.shape),
                            stype="numpy.ndarray", data=draw(st.binary(max_size=64)))
    elif kind == "stype":
        arrays[key] = Array(dtype=str(value.dtype), shape=tuple(value.shape),
                            stype="torch.raw", data=value.tobytes())
    elif kind == "empty":
        arrays.clear()


@st.composite
def train_contents(draw, *, site: str | None) -> RecordDict:
    """A training reply: the global arrays moved a little, a plausible count and loss, and the
    site's evaluation of the model it received; or that with one or two kinds of damage to its
    arrays, metrics, evaluation or records."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scale = draw(st.sampled_from([0.0, 1e-3, 0.1, 1.0]))
    arrays: dict[str, object] = {
        k: (v + rng.normal(0, scale, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
        for k, v in GLOBAL.items()}
    metrics = {WEIGHT_KEY: draw(st.integers(1, 200)), "train-loss": draw(st.floats(0, 5))}
    damage = [] if _honest(draw) else draw(
        st.lists(st.sampled_from(ARRAY_DAMAGE + RECORD_DAMAGE), min_size=1, max_size=2))
    for kind in damage:
        if kind in ARRAY_DAMAGE:
            _damage_array(draw, arrays, kind)
        elif kind == "n":
            metrics[WEIGHT_KEY] = draw(NUMBERS)
        elif kind == "loss":
            metrics["train-loss"] = draw(NUMBERS)
        elif kind == "drop metric":
            metrics.pop(draw(st.sampled_from([WEIGHT_KEY, "train-loss"])), None)
        elif kind == "extra metric":
            metrics[draw(st.sampled_from(["val-loss", "junk"]))] = draw(NUMBERS)
    evaluation = _valid_evaluation(draw)
    if "evaluation" in damage:
        _damage_evaluation(draw, evaluation)
    content = RecordDict({
        "arrays": ArrayRecord({k: v if isinstance(v, Array) else Array(np.asarray(v))
                               for k, v in arrays.items()}),
        "metrics": MetricRecord(metrics), EVALUATION: MetricRecord(evaluation)})
    if "more arrays" in damage:
        content["more"] = ArrayRecord({"x": Array(np.zeros(2, np.float32))})
    if "no arrays" in damage:
        del content["arrays"]
    if "no metrics" in damage:
        del content["metrics"]
    if "no evaluation" in damage:
        del content[EVALUATION]
    if "more metrics" in damage:
        content["extra"] = MetricRecord({"x": 1.0})
    if site is not None:
        content["site"] = ConfigRecord({"name": site})
    return content


def _site_names(sites: int) -> st.SearchStrategy:
    return st.one_of(st.sampled_from([f"site-{i}" for i in range(sites)]),
                     st.sampled_from(["intruder", "site-99", "", None]))


def _replies(draw, strategy: MedfedStrategy, messages: list[Message], sites: int,
             make_content) -> list[Message]:
    """Replies to some of `messages` (and to a forged request): contents from `make_content`,
    site names right, wrong, repeated or missing, some error replies."""
    replies = []
    forged = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=99,
                     message_type=MessageType.TRAIN)
    # Mostly each site once, in any order; sometimes a site twice, a forged node, or nobody.
    targets = draw(st.permutations(messages) if draw(st.integers(0, 3)) else
                   st.lists(st.sampled_from([*messages, forged]), max_size=len(messages) + 2))
    for message in targets:
        if draw(st.integers(0, 9)) == 0:
            replies.append(Message(Error(code=0, reason="ClientAppException: disk full"),
                                   reply_to=message))
            continue
        default = strategy.registry.get(message.metadata.dst_node_id) if strategy.registry else None
        default = default or f"site-{(message.metadata.dst_node_id - 1) % sites}"
        site = default if draw(st.integers(0, 5)) else draw(_site_names(sites))
        replies.append(Message(draw(make_content(site=site)), reply_to=message))
    return replies


def _accounted(replies: list[Message], record, *, kept: dict, rejected: list[str]) -> None:
    """Every reply that is not an error is either kept or rejected with a one-line reason."""
    answered = [r for r in replies if not r.has_error()]
    assert len(kept) + len(rejected) == len(answered), (kept, rejected)
    for line in rejected:
        site, sep, reason = line.partition(": ")
        assert sep and reason and "\n" not in line, line
    assert len(record.failures) >= len(replies) - len(answered)


@pytest.mark.parametrize("name", STRATEGIES)
@fuzz(15)
@given(data=st.data(), sites=st.integers(3, 5), registered=st.booleans())
def test_training_replies_are_aggregated_or_rejected_with_a_reason(name, data, sites, registered):
    registry = {i + 1: f"site-{i}" for i in range(sites)} if registered else None
    strategy = tiny_strategy(name, sites=sites, registry=registry)
    grid = type("Grid", (), {"get_node_ids": lambda self: list(range(1, sites + 1))})()
    initial = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    replies = _replies(data.draw, strategy, messages, sites, train_contents)
    sent = {id(r): _decoded(r) for r in replies}

    arrays, _ = strategy.aggregate_train(1, replies)

    record = strategy.rounds[1]
    _accounted(replies, record, kept=record.train, rejected=record.rejected)
    event(f"{len(record.train)} accepted")
    event(f"{len(record.rejected)} rejected")
    if any(": its evaluation of the model it received: " in line for line in record.rejected):
        event("an evaluation rejected")
    for site, values in record.train.items():
        assert site in strategy.expected_sites
        assert isinstance(values["n"], int) and 1 <= values["n"] <= MAX_EXAMPLES
        assert math.isfinite(values["loss"])
    # The evaluations of the model the sites received (round 0's) are kept for exactly the
    # accepted replies, and the report can read each of them.
    assert set(strategy.rounds[0].evaluate) == set(record.train)
    _readable(strategy.rounds[0].evaluate)
    if not record.train:
        assert arrays is None
        return
    kept = [sent[id(r)] for r in replies if sent[id(r)] is not None
            and _name(r, strategy) in record.train
            and not any(line.startswith(f"{_name(r, strategy)}: ") for line in record.rejected)]
    assert len(kept) == len(record.train)
    for update in kept:
        assert set(update) == set(GLOBAL)
        for key, value in update.items():
            assert value.dtype == GLOBAL[key].dtype and value.shape == GLOBAL[key].shape
            assert np.isfinite(value).all()
    if arrays is None:
        assert name == "bulyan"  # too few accepted updates for its 4f + 3
        return
    sizes = [record.train[_name(r, strategy)]["n"] for r in replies if sent[id(r)] is not None
             and _name(r, strategy) in record.train]
    assert set(arrays) == set(GLOBAL)
    for key, value in ((k, a.numpy()) for k, a in arrays.items()):
        assert value.dtype == GLOBAL[key].dtype and value.shape == GLOBAL[key].shape, key
        assert np.isfinite(value).all(), key
        stacked = np.stack([u[key] for u in kept]).astype(np.float64)
        slack = 1e-6 * np.maximum(1.0, np.abs(stacked).max(axis=0)) + (value.dtype.kind == "i")
        if name in ("fedavg", "fedprox"):
            # The example-weighted mean of exactly the accepted updates.
            expected = np.average(stacked, axis=0, weights=sizes)
            assert np.all(np.abs(value - expected) <= slack), key
        if name == "fedadam" and key not in STATISTICS:
            continue  # a server optimizer's step is not bounded by the updates themselves
        # Averages, medians, trimmed means and selections stay within what the sites sent.
        assert np.all(value >= stacked.min(axis=0) - slack), key
        assert np.all(value <= stacked.max(axis=0) + slack), key


@pytest.mark.parametrize("name", STRATEGIES)
@fuzz(4)
@given(sites=st.integers(3, 5),
       values=st.lists(st.sampled_from([3.4e38, -3.4e38, 3e38, 1e38, 1.0]), min_size=5, max_size=5))
def test_updates_near_the_float32_limit_never_make_the_global_model_inf(name, sites, values):
    """All sites (so no norm outlier) send finite updates near float32's largest value: the
    aggregate is finite or the round leaves the global model unchanged, and says so."""
    strategy = tiny_strategy(name, sites=sites, registry=None)
    grid = type("Grid", (), {"get_node_ids": lambda self: list(range(1, sites + 1))})()
    initial = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    messages = sorted(strategy.configure_train(1, initial, ConfigRecord(), grid),
                      key=lambda m: m.metadata.dst_node_id)
    replies = []
    for i, (message, value) in enumerate(zip(messages, values)):
        arrays = {k: np.full(v.shape, value, v.dtype) if v.dtype.kind == "f" else v
                  for k, v in GLOBAL.items()}
        replies.append(Message(RecordDict({
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({WEIGHT_KEY: 10 + i, "train-loss": 0.5}),
            EVALUATION: evaluation_record(5, num_classes=len(CLASSES)),
            "site": ConfigRecord({"name": f"site-{i}"})}), reply_to=message))

    arrays, _ = strategy.aggregate_train(1, replies)

    # Only their size may count against these replies; their records are all valid.
    assert all("update norm" in r for r in strategy.rounds[1].rejected)
    if arrays is None:
        assert name == "bulyan" or any("not finite" in f for f in strategy.rounds[1].failures)
    else:
        assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


def _decoded(reply: Message) -> dict[str, np.ndarray] | None:
    """What a reply sent, as the test reads it (None where it cannot be read at all)."""
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return None
    try:
        return {k: a.numpy() for k, a in reply.content["arrays"].items()}
    except Exception:
        return None


def _name(reply: Message, strategy: MedfedStrategy) -> str:
    return site_name(reply, strategy.registry)


def _readable(evaluations: dict[str, dict]) -> None:
    """The report's reading of each kept evaluation record works and adds up."""
    for raw in evaluations.values():
        for split in EVALUATED_SPLITS:
            metrics = split_metrics(raw, split, len(CLASSES))
            assert np.asarray(metrics["confusion_matrix"]).shape == (len(CLASSES), len(CLASSES))
            assert metrics["n"] == sum(raw[f"{split}-histogram"])


def _valid_evaluation(draw) -> dict:
    """An honest evaluation record's values, built by the one builder sites use."""
    k = len(CLASSES)
    results, histograms = {}, {}
    for split in ("train", *EVALUATED_SPLITS):
        histograms[split] = draw(st.lists(st.integers(0, 40), min_size=k, max_size=k))
        histograms[split][0] += sum(histograms[split]) == 0  # a site's splits are never empty
    for split in EVALUATED_SPLITS:
        matrix = np.zeros((k, k), dtype=int)
        for true, count in enumerate(histograms[split]):
            predicted = draw(st.lists(st.integers(0, count), min_size=k - 1, max_size=k - 1))
            cuts = sorted(predicted)
            matrix[true] = np.diff([0, *cuts, count])
        result = {name: draw(st.one_of(st.floats(0, 1), st.none())) for name in SCALARS}
        results[split] = {**result, "loss": draw(st.floats(0, 10)),
                          "confusion_matrix": matrix.tolist()}
    return dict(evaluation_metrics(results, histograms=histograms,
                                   num_examples=sum(histograms["val"])))


def _damage_evaluation(draw, metrics: dict) -> None:
    """Up to three of an evaluation record's values dropped, replaced, made lists, or (lists)
    cut short, lengthened or made negative."""
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*sorted(metrics), "junk", "val-extra"]))
        kind = draw(st.sampled_from(["drop", "value", "list", "shorter", "longer", "negative"]))
        if kind == "drop":
            metrics.pop(key, None)
        elif kind == "value":
            metrics[key] = draw(NUMBERS)
        elif kind == "list":
            metrics[key] = draw(st.one_of(st.lists(st.integers(-3, 10**20), max_size=12),
                                          st.lists(st.floats(), max_size=12)))
        elif isinstance(metrics.get(key), list) and metrics[key]:
            values = list(metrics[key])
            if kind == "shorter":
                values = values[:-1]
            elif kind == "longer":
                values = values + values[:1]
            else:
                values[0] = -1 if isinstance(values[0], int) else -1.0
            metrics[key] = values


@st.composite
def evaluation_contents(draw, *, site: str | None) -> RecordDict:
    """An evaluation reply as a site builds it; or that with up to three of its values damaged
    (`_damage_evaluation`), or an extra record."""
    metrics = _valid_evaluation(draw)
    honest = _honest(draw)
    if not honest:
        _damage_evaluation(draw, metrics)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if not honest and draw(st.integers(0, 4)) == 0:
        content["extra"] = MetricRecord({"x": 1.0})
    if site is not None:
        content["site"] = ConfigRecord({"name": site})
    return content


@fuzz(80)
@given(data=st.data(), name=st.sampled_from(STRATEGIES), sites=st.integers(3, 4),
       registered=st.booleans())
def test_evaluation_replies_are_kept_or_rejected_and_the_report_reads_what_was_kept(
        data, name, sites, registered):
    registry = {i + 1: f"site-{i}" for i in range(sites)} if registered else None
    # One round: the last round, the one whose aggregate gets evaluation messages of its own.
    strategy = tiny_strategy(name, sites=sites, registry=registry, rounds=1)
    grid = type("Grid", (), {"get_node_ids": lambda self: list(range(1, sites + 1)),
                             "send_and_receive": lambda self, messages, timeout: replies})()
    initial = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    messages = list(strategy.configure_evaluate(1, initial, ConfigRecord(), grid))
    replies = _replies(data.draw, strategy, messages, sites, evaluation_contents)

    aggregated = strategy.aggregate_evaluate(1, replies)

    record = strategy.rounds[1]
    rejected = [f for f in record.failures if "ClientAppException" not in f]
    _accounted(replies, record, kept=record.evaluate, rejected=rejected)
    event(f"{len(record.evaluate)} kept")
    event(f"{len(rejected)} rejected")
    assert set(record.evaluate) <= set(strategy.expected_sites)
    if aggregated is not None:
        assert record.evaluate
    _readable(record.evaluate)
    # The final evaluation goes through the same reading; then the whole report is written.
    final = strategy.evaluate_final(grid, initial, timeout=1.0)
    report = build_report(
        config=Config().to_dict(), dataset={"name": "fuzz", "classes": CLASSES}, partition=None,
        rounds=strategy.rounds, final_sites=final, final_global=None,
        early_stopping={"stopped_at": None, "best_round": 1, "best_val_loss": None},
        model={"backbone": "b", "weights": "none", "freeze": "3", "trainable_params": 1,
               "total_params": 1, "exchanged_tensors": 1, "payload_bytes": 4,
               "head_payload_bytes": 4, "head_center_bytes": 0,
               "head_start_bytes": {"up": 0, "down": 0}},
        wall_s=1.0,
    )
    json.dumps(report, allow_nan=False)
    assert set(report["sites"]) == set(final.evaluate)
    render_markdown(report)
