"""DSDR's diversity metrics in dsdr.py (dsdr spec, Eqs. 5–8, D1, D2, D7): embedding distance and D_emb, formula
extraction and D_eq, the MiniLM encoder (offline), and eval.py's group-level evaluation summaries."""

import math
import time

import pytest
import torch

import dsdr
from dsdr import embedding_distance_matrix, embedding_diversity, extract_formulas, formula_uniqueness
from eval import formula_diversity, semantic_diversity

# ---- embedding distance (Eq. 5) and D_emb (Eq. 6) ---------------------------------------------------


def test_identical_embeddings_have_distance_zero():
    z = torch.tensor([[0.3, -1.2, 2.0], [0.3, -1.2, 2.0], [0.6, -2.4, 4.0]])  # same direction, any scale
    d = embedding_distance_matrix(z)
    assert torch.allclose(d, torch.zeros(3, 3), atol=1e-6)
    assert torch.allclose(embedding_diversity(z), torch.zeros(3), atol=1e-6)


def test_orthogonal_is_half_and_opposite_is_one():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = embedding_distance_matrix(z)
    assert d[0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert d[1, 2].item() == pytest.approx(0.5, abs=1e-6)
    assert d[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    # D_emb is the mean over the other two: o_0 → (0.5 + 1)/2, o_1 → (0.5 + 0.5)/2
    assert torch.allclose(embedding_diversity(z), torch.tensor([0.75, 0.5, 0.75]), atol=1e-6)


def test_distance_matrix_is_symmetric_zero_diagonal_and_bounded():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 384, generator=g)
    z[3] = z[1]  # a duplicate
    z[4] = -z[0]  # an antipode
    d = embedding_distance_matrix(z)
    assert d.shape == (9, 9)
    assert torch.equal(d, d.T)
    assert torch.equal(torch.diagonal(d), torch.zeros(9))
    assert d.min() >= 0 and d.max() <= 1
    assert d[1, 3].item() == pytest.approx(0.0, abs=1e-6) and d[0, 4].item() == pytest.approx(1.0, abs=1e-6)
    div = embedding_diversity(z)
    assert div.shape == (9,) and div.min() >= 0 and div.max() <= 1
    assert torch.allclose(div, d.sum(1) / 8)  # Eq. 6: row sums over (G − 1)


def test_embedding_diversity_peers_mask():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 0.0]])
    peers = torch.tensor([True, True, False, False])
    div = embedding_diversity(z, peers_mask=peers)
    # o_0 and o_1 have one peer each (the other one): distance 0.5
    assert div[0].item() == pytest.approx(0.5) and div[1].item() == pytest.approx(0.5)
    # non-peers are scored against both peers: o_2 → (1 + 0.5)/2, o_3 → (0 + 0.5)/2
    assert div[2].item() == pytest.approx(0.75) and div[3].item() == pytest.approx(0.25)
    # a lone peer, and a group of one, have nobody to compare with → 0
    lone = embedding_diversity(z, peers_mask=[True, False, False, False])
    assert lone[0].item() == 0.0 and lone[2].item() == pytest.approx(1.0)
    assert embedding_diversity(z[:1]).tolist() == [0.0]
    assert torch.allclose(embedding_diversity(z, peers_mask=[True] * 4), embedding_diversity(z))
    with pytest.raises(ValueError):
        embedding_diversity(z, peers_mask=[True, False])


# ---- formula uniqueness D_eq (Eqs. 7–8) -------------------------------------------------------------


def test_formula_uniqueness_spec_example():
    assert formula_uniqueness([{"a", "b"}, {"b"}, set()]).tolist() == [0.5, 0.0, 0.0]


def test_formulas_appearing_nowhere_else_score_one():
    out = formula_uniqueness([{"x=1", "y=2"}, {"z=3"}, {"x=1"}, set()])
    assert out.tolist() == [0.5, 1.0, 0.0, 0.0]
    assert formula_uniqueness([{"a"}, {"b"}, {"c", "d"}]).tolist() == [1.0, 1.0, 1.0]
    assert formula_uniqueness([{"a"}, {"a"}]).tolist() == [0.0, 0.0]
    assert formula_uniqueness([{"a"}, set()]).tolist() == [1.0, 0.0]  # nobody else holds it
    assert formula_uniqueness([{"a"}]).tolist() == [0.0]  # no other rollout at all: no peer → 0 (D1)


def test_formula_uniqueness_peers_mask():
    sets = [{"a", "b"}, {"b"}, {"a"}]
    # peers {0, 1}: o_0's "a" is held only by the non-peer o_2 → unique; "b" is shared with o_1
    assert formula_uniqueness(sets, peers_mask=[True, True, False]).tolist() == [0.5, 0.0, 0.0]
    # a lone peer has no one to compare with (P∖{i} = ∅) → 0 (D1); the non-peers are judged against
    # that peer alone
    assert formula_uniqueness(sets, peers_mask=[False, True, False]).tolist() == [0.5, 0.0, 1.0]
    assert formula_uniqueness(sets, peers_mask=[False, False, False]).tolist() == [0.0, 0.0, 0.0]


# ---- formula extraction (D2) ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (r"We get $x^2 + 1$ and \(f(x)\), so y = 2x + 1.", {"x^2+1", "f(x)", "y=2x+1"}),  # spec example
    ("$$a = b$$", {"a=b"}),  # spec example (DIVER yields an empty string here)
    ("Area = 12", set()),  # "Area" is a word, so the run "= 12" has nothing left of "="
    (r"\[x+1=2\]", {"x+1=2"}),
    (r"Then \(f(x)\) is odd.", {"f(x)"}),  # the ")" inside does not close the span
    (r"It costs \$5 and \$7 today.", set()),  # escaped dollars are text
    (r"pay \$5 for $x+1$", {"x+1"}),
    ("unclosed $x and more", set()),
    ("$x + 1\n= y$", set()),  # `$…$` may not cross a newline; neither line is an equation
    (r"$$ M_{ij} = [A]_{ij} $$", {"M_{ij}=[A]_{ij}"}),  # a display block containing "]"
    (r"\[ v = [1, 2] \]", {"v=[1,2]"}),
    ("$a$$b$", {"a", "b"}),
    (r"\[unclosed display and \(g(y)\)", {"g(y)"}),
    ("$$ $$ and $ $", set()),  # empty contents are dropped
    ("5*3=15,15+7=22", {"5*3=15", "15+7=22"}),  # a toy Countdown chain: one formula per step
    ("3*7=21,21+2=23,23*2=46", {"3*7=21", "21+2=23", "23*2=46"}),
    ("so x = 1, y = 2.", {"x=1", "y=2"}),  # a chain written with spaces
    ("so f(x, y) = x + y.", {"f(x,y)=x+y"}),  # not every comma piece is an equation: kept whole
    ("Thus a = b.", {"a=b"}),  # a single letter before the full stop is still math-like
    ("x + 1 = 2 is true and the total is 7.", {"x+1=2"}),
    ("the answer =", set()),
    ("x\t+ 1 =  2", {"x+1=2"}),  # whitespace is deleted
])
def test_extract_formulas_examples(text, expected):
    assert extract_formulas(text) == expected


def test_extract_formulas_same_formula_different_spacing_is_one_element():
    assert extract_formulas("$x + 1$ then $x+1$ and again x +1 = 3") == {"x+1", "x+1=3"}


def test_extract_formulas_max_chars_truncates_first():
    text = "a" * 5 + " $y=1$ " + "filler " * 200 + " $z=2$"
    assert extract_formulas(text) == {"y=1", "z=2"}
    assert extract_formulas(text, max_chars=1000) == {"y=1"}
    assert extract_formulas(text, max_chars=9) == set()  # "$y=1" is cut: unclosed


def test_extract_formulas_is_fast_on_a_megabyte():
    nasty = [
        r"\[ \( $ " * 130_000,  # thousands of unclosed openers
        "$" * 1_000_000,
        ("x = 1 + 2, " * 90_000),  # one huge bare run
        ("We have $a_1 + b$ and y = 2x + 1.\n" * 30_000),
    ]
    for text in nasty:
        assert len(text) >= 900_000
        t0 = time.perf_counter()
        extract_formulas(text)
        assert time.perf_counter() - t0 < 5.0


# ---- the MiniLM encoder (D7), offline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    return dsdr.get_encoder()


def test_get_encoder_is_cached(encoder):
    assert dsdr.get_encoder() is encoder
    assert encoder.max_seq_length == 256 and encoder.model.max_seq_length == 256


def test_encoder_identical_texts_give_identical_unit_rows(encoder):
    z = encoder.encode(["a cat", "a cat"])
    assert z.shape == (2, 384) and z.dtype == torch.float32 and not z.requires_grad
    assert torch.equal(z[0], z[1])
    assert torch.allclose(z.norm(dim=1), torch.ones(2), atol=1e-5)
    assert embedding_diversity(z).abs().max() < 1e-6
    assert encoder.encode([]).shape == (0, 384)


def test_encoder_paraphrase_is_closer_than_unrelated(encoder):
    z = encoder.encode(["The cat sat on the mat.", "A cat was sitting on the mat.",
                        "Quarterly revenue grew by five percent."])
    d = embedding_distance_matrix(z)
    assert d[0, 1] < d[0, 2] and d[0, 1] < d[1, 2]


def test_encoder_embeds_each_unique_text_once(encoder, monkeypatch):
    seen = []
    real = encoder.model.encode

    def spy(sentences, *args, **kwargs):
        seen.extend(sentences)
        return real(sentences, *args, **kwargs)

    monkeypatch.setattr(encoder.model, "encode", spy)
    texts = ["x = 1", "y = 2", "x = 1", "z", "y = 2", "x = 1"]
    z = encoder.encode(texts)
    assert sorted(seen) == sorted(set(texts))  # each distinct text once, nothing else
    assert z.shape == (6, 384)
    assert torch.equal(z[0], z[2]) and torch.equal(z[0], z[5]) and torch.equal(z[1], z[4])
    assert not torch.equal(z[0], z[1])


def test_encoder_rejects_more_than_512_positions():
    with pytest.raises(ValueError, match="512"):
        dsdr.SentenceEncoder(max_seq_length=513)


# ---- group-level summaries --------------------------------------------------------------------------


def test_semantic_diversity_of_identical_texts_is_zero(encoder):
    assert semantic_diversity([["same", "same"]], encoder=encoder) == pytest.approx(0.0, abs=1e-6)


def test_semantic_diversity_averages_prompts_and_respects_only(encoder):
    a, b, c = "The cat sat on the mat.", "Stock prices fell sharply.", "Photosynthesis needs light."
    z = encoder.encode([a, b, c])
    d = embedding_distance_matrix(z)
    calls = []
    real = encoder.encode

    class Counting:
        def encode(self, texts):
            calls.append(list(texts))
            return real(texts)

    groups = [[a, b, c], [a, a], [b]]  # the third prompt has a single text: skipped
    got = semantic_diversity(groups, encoder=Counting())
    expected = ((d[0, 1] + d[0, 2] + d[1, 2]).item() / 3 + 0.0) / 2
    assert got == pytest.approx(expected, abs=1e-5)
    assert len(calls) == 1  # one encode call for all prompts
    only = [[True, False, True], [True, False], [True]]  # only prompt 0 keeps a pair
    assert semantic_diversity(groups, encoder=encoder, only=only) == pytest.approx(d[0, 2].item(), abs=1e-5)
    assert math.isnan(semantic_diversity([["lonely"]], encoder=encoder))
    assert math.isnan(semantic_diversity(groups, encoder=encoder, only=[[False] * 3, [True, False], [True]]))


def test_formula_diversity():
    groups = [["$a$ and $b$", "$b$", "no math here"],  # D_eq = [0.5, 0, 0] → mean 1/6
              ["5*3=15,15+7=22", "5*3=15,15*2=30"]]  # each chain has one own step → [0.5, 0.5]
    assert formula_diversity(groups) == pytest.approx((1 / 6 + 0.5) / 2)
    only = [[True, True, False], [True, False]]  # prompt 0 → [0.5, 0]; prompt 1 has no pair: skipped
    assert formula_diversity(groups, only=only) == pytest.approx(0.25)
    assert math.isnan(formula_diversity([["$x$"]]))
    with pytest.raises(ValueError):
        formula_diversity(groups, only=[[True]])
