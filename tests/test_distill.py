"""Distillation of the shrunken encoder from its full-size teacher."""
import itertools

import numpy as np
import pytest
import torch

from model.distill import distill_encoder
from model.text import TextEncoder
from tests.conftest import CORPUS


def _distance(student: TextEncoder, teacher: TextEncoder, texts: list[str]) -> float:
    a = student.encode(texts, show_progress=False)
    b = teacher.encode(texts, show_progress=False)
    return float(1 - (a * b).sum(1).mean())


def test_distillation_brings_the_student_closer_on_unseen_profiles(tiny_roberta):
    pairs = [f"{a} {b}" for a, b in itertools.permutations(CORPUS, 2)]  # 30 texts
    unseen = [f"{a} {b} {a}" for a, b in zip(CORPUS, CORPUS[1:])]
    teacher = TextEncoder.from_pretrained(str(tiny_roberta), quantize=False)
    student = TextEncoder.from_pretrained(str(tiny_roberta), layers=1, quantize=False)
    torch.manual_seed(0)  # a random tiny model's layers barely move its output: start far
    for parameter in student.model.encoder.layer.parameters():
        parameter.data.normal_(0, 0.5)
    before = _distance(student, teacher, unseen)
    assert before > 0.05
    distilled, log = distill_encoder(student, teacher, pairs, steps=60, batch=8, lr=1e-3,
                                     eval_every=20, seed=0)
    assert log["heldout_distance_after"] < log["heldout_distance_before"]
    assert _distance(distilled, teacher, unseen) < 0.7 * before
    assert distilled.model.config.num_hidden_layers == 1  # still the shrunk student


def test_a_student_of_another_width_is_refused(tiny_roberta):
    teacher = TextEncoder.from_pretrained(str(tiny_roberta), quantize=False)
    student = TextEncoder.from_pretrained("minilm", layers=1, quantize=False)
    with pytest.raises(ValueError, match="shrunk copy of the teacher"):
        distill_encoder(student, teacher, CORPUS * 5)
