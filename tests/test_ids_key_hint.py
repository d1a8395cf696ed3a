"""A dict batch without the tracker's ``ids_key`` but with a key named like sample ids: the refusal names the
``ids_key=`` that reads it (it listed the keys and advised WithIds, whose tuples a dict batch does not use)."""

from __future__ import annotations

import pytest
import torch

from lightning_influence.data import extract_ids


@pytest.mark.parametrize("key, ids_key", [("idx", "ids"), ("ids", "idx"), ("sample_id", "ids")])
def test_a_dict_batch_with_its_ids_under_another_key_is_told_the_ids_key(key, ids_key):
    batch = {"tokens": torch.zeros(3, 4, dtype=torch.long), "label": torch.tensor([0, 1, 0]), key: torch.arange(3)}
    with pytest.raises(ValueError, match=rf"no '{ids_key}' key .*pass InfluenceTracker\(ids_key='{key}'\)"):
        extract_ids(batch, ids_key=ids_key)
    assert torch.equal(extract_ids(batch, ids_key=key), torch.arange(3))  # what the message says works


def test_a_dict_batch_without_any_id_like_key_gets_the_general_advice():
    with pytest.raises(ValueError, match="no 'ids' key") as info:
        extract_ids({"x": torch.zeros(2, 3), "label": torch.tensor([0, 1])})
    assert "ids_key=" not in str(info.value) and "WithIds" in str(info.value)
