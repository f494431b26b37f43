"""A deployed site's data: an npz, or a folder/manifest the site decodes and splits itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from imagefiles import gradient, write_png

from medfed.client.site_data import load_site, locate_site
from medfed.common.config import Config
from medfed.common.messages import RoundConfig


def test_node_config_names_the_site_and_its_folder(tmp_path):
    received = RoundConfig(config_json=Config().to_json(), classes=("a", "b"), study="s", server_round=1,
                           lr=None, stage="head", proximal_mu=0.0, sites_dir=None, site_names=())
    name, path = locate_site({"site": "hospital-a", "data-path": str(tmp_path)}, received)
    assert (name, path) == ("hospital-a", Path(tmp_path))
    with pytest.raises(ValueError, match="--node-config"):
        locate_site({}, received)


def test_folder_is_split_by_the_site_with_the_federation_seed_and_classes(tmp_path):
    for i in range(30):
        write_png(tmp_path / "cxr" / ("pneumonia" if i % 3 else "normal") / f"{i}.png", gradient(i))
    config = Config()
    config.data.image_size = 32
    splits = load_site(tmp_path / "cxr", config_json=config.to_json(),
                       classes=("covid", "normal", "pneumonia"), site="hospital-a",
                       state=tmp_path / "state")
    assert set(splits) == {"train", "val", "test"}
    assert sum(len(s) for s in splits.values()) == 30
    assert splits["train"].images.shape[1:] == (32, 32)
    labels = np.concatenate([s.labels for s in splits.values()])
    # Labels are numbered by the federation's class list: "covid" (0) is absent at this site.
    assert sorted(set(labels.tolist())) == [1, 2]
    again = load_site.__wrapped__(tmp_path / "cxr", config_json=config.to_json(),
                                  classes=("covid", "normal", "pneumonia"), site="hospital-a",
                                  state=tmp_path / "state")
    np.testing.assert_array_equal(again["test"].labels, splits["test"].labels)
