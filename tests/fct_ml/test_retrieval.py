"""Tests for fct_ml.retrieval: rankings, AP and top-k worked out by hand on tiny galleries."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from fct_ml.retrieval import (
    RetrievalResult,
    evaluate_retrieval,
    pairwise_distance,
    retrieve,
    retrieve_mixed,
)


def col(*values: float) -> torch.Tensor:
    """1-D points as an (N, 1) embedding."""
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)


def labels(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


# --------------------------------------------------------------------------- #
# A hand-ranked 1-D example
#
# gallery positions  0   2   5   9   14
# gallery labels     A   B   A   B   A      (A=0, B=1)
#
# q0 = 3, label A: |3-x| = 3, 1, 2, 6, 11 -> ranking 2(B) 5(A) 0(A) 9(B) 14(A)
#    matches at ranks 2, 3, 5: AP = (1/2 + 2/3 + 3/5) / 3; top1 miss, top2 hit, top5 hit
# q1 = 10, label B: |10-x| = 10, 8, 5, 1, 4 -> ranking 9(B) 14(A) 5(A) 2(B) 0(A)
#    matches at ranks 1, 4: AP = (1/1 + 2/4) / 2 = 0.75; top1 hit
# q2 = 13, label C (=2): no item of C in the gallery -> left out of the averages
# --------------------------------------------------------------------------- #

GALLERY = col(0, 2, 5, 9, 14)
GALLERY_LABELS = labels(0, 1, 0, 1, 0)
QUERY = col(3, 10, 13)
QUERY_LABELS = labels(0, 1, 2)
AP_Q0 = (1 / 2 + 2 / 3 + 3 / 5) / 3
AP_Q1 = (1 / 1 + 2 / 4) / 2


def test_hand_ranked_example_per_query():
    result = retrieve(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS, topk=(1, 2, 5))
    assert isinstance(result, RetrievalResult)
    assert result.topk == (1, 2, 5)
    assert result.average_precision.shape == (3,)
    assert result.average_precision[0].item() == pytest.approx(AP_Q0)
    assert result.average_precision[1].item() == pytest.approx(AP_Q1)
    assert result.average_precision[2].item() == 0.0  # no match: AP 0, and excluded below
    assert result.has_match.tolist() == [True, True, False]
    #                              top1   top2   top5
    assert result.hits[0].tolist() == [False, True, True]
    assert result.hits[1].tolist() == [True, True, True]
    assert result.hits[2].tolist() == [False, False, False]


def test_hand_ranked_example_summary():
    out = evaluate_retrieval(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    assert set(out) == {"top1", "top5", "mAP", "n_queries"}
    assert out["n_queries"] == 2  # q2 has no match and is left out
    assert out["top1"] == pytest.approx(1 / 2)  # q0 miss, q1 hit
    assert out["top5"] == pytest.approx(1.0)  # both have a match within the 5 items
    # mAP = ((1/2 + 2/3 + 3/5)/3 + 0.75) / 2 = (0.588888... + 0.75) / 2 = 0.669444...
    assert out["mAP"] == pytest.approx(((1 / 2 + 2 / 3 + 3 / 5) / 3 + 0.75) / 2)
    assert out["mAP"] == pytest.approx(0.6694444, abs=1e-6)


def test_summary_mask_restricts_queries():
    result = retrieve(QUERY, QUERY_LABELS, GALLERY, GALLERY_LABELS)
    only_q1 = result.summary(torch.tensor([False, True, False]))
    assert only_q1 == {"top1": 1.0, "top5": 1.0, "mAP": pytest.approx(0.75), "n_queries": 1}
    only_q0 = result.summary(torch.tensor([True, False, False]))
    assert only_q0["top1"] == 0.0
    assert only_q0["mAP"] == pytest.approx(AP_Q0)
    assert only_q0["n_queries"] == 1
    # q2 has no match: the mask cannot bring it back in
    q0_and_q2 = result.summary(torch.tensor([True, False, True]))
    assert q0_and_q2["n_queries"] == 1
    assert q0_and_q2["mAP"] == pytest.approx(AP_Q0)
    # nothing selected: NaN metrics, zero queries
    empty = result.summary(torch.tensor([False, False, True]))
    assert empty["n_queries"] == 0
    assert math.isnan(empty["top1"]) and math.isnan(empty["mAP"])


# --------------------------------------------------------------------------- #
# Ties are broken against the query
# --------------------------------------------------------------------------- #


def test_tie_breaks_against_the_query_1d():
    # query 0 (label 0); gallery +1 (label 0, match) and -1 (label 1): both at distance 1.
    # Non-match ranks first -> top1 miss, match at rank 2: AP = 1/2.
    for gallery, gallery_labels in ((col(1, -1), labels(0, 1)), (col(-1, 1), labels(1, 0))):
        result = retrieve(col(0), labels(0), gallery, gallery_labels, topk=(1, 2))
        assert result.hits[0].tolist() == [False, True]
        assert result.average_precision[0].item() == pytest.approx(1 / 2)


def test_tie_break_does_not_depend_on_gallery_order():
    # query (0, 0) label 0. Gallery:
    #   a = (1, 0) label 0 match,      squared distance 1
    #   b = (0, 1) label 1 non-match,  squared distance 1  (tie with a: b ranks first)
    #   c = (0, 2) label 0 match,      squared distance 4
    #   d = (3, 0) label 1 non-match,  squared distance 9
    # ranking b a c d: matches at ranks 2, 3 -> AP = (1/2 + 2/3) / 2 = 7/12; top1 miss.
    items = [((1.0, 0.0), 0), ((0.0, 1.0), 1), ((0.0, 2.0), 0), ((3.0, 0.0), 1)]
    query = torch.zeros(1, 2)
    for perm in itertools.permutations(range(4)):
        gallery = torch.tensor([items[i][0] for i in perm])
        gallery_labels = torch.tensor([items[i][1] for i in perm])
        result = retrieve(query, labels(0), gallery, gallery_labels, topk=(1, 2, 3))
        assert result.average_precision[0].item() == pytest.approx(7 / 12), perm
        assert result.hits[0].tolist() == [False, True, True], perm


def test_collapsed_embeddings_score_worst_case():
    # All embeddings identical (e.g. all-zero ReLU outputs): every item ties, so the two
    # non-matches rank ahead of both matches: ranks 3, 4 -> AP = (1/3 + 2/4) / 2 = 5/12.
    gallery = torch.zeros(4, 3)
    for gallery_labels in (labels(0, 0, 1, 1), labels(1, 0, 1, 0), labels(0, 1, 1, 0)):
        out = evaluate_retrieval(
            torch.zeros(1, 3), labels(0), gallery, gallery_labels, topk=(1, 2, 3)
        )
        assert out["top1"] == 0.0
        assert out["top2"] == 0.0
        assert out["top3"] == 1.0
        assert out["mAP"] == pytest.approx(5 / 12)


def test_distances_near_zero_keep_their_order():
    # Squared distances 2^-28 (the match) and 2^-26 (the non-match) are exact in float32 but
    # lie below half its spacing at 1 (2^-24): shifting them by 1 before the sort would round
    # both to 1, and the tie would rank the non-match first (AP 1/2).
    result = retrieve(col(0), labels(0), col(2**-14, 2**-13), labels(0, 1), topk=(1,))
    assert result.hits[0].tolist() == [True]
    assert result.average_precision[0].item() == 1.0


# --------------------------------------------------------------------------- #
# Leave-one-out
#
# items  x:     0   3   4   10   20
#        label: 0   1   0   1    2
# i=0 (x=0, l0):  others 3(1):3  4(0):4  10(1):10  20(2):20 -> ranking 3 4 10 20, match rank 2: AP
# 1/2
# i=1 (x=3, l1):  0(0):3  4(0):1  10(1):7  20(2):17          -> ranking 4 0 10 20, match rank 3: AP
# 1/3
# i=2 (x=4, l0):  0(0):4  3(1):1  10(1):6  20(2):16          -> ranking 3 0 10 20, match rank 2: AP
# 1/2
# i=3 (x=10, l1): 0(0):10 3(1):7  4(0):6   20(2):10          -> ranking 4 3 {0,20}, match rank 2: AP
# 1/2
# i=4 (x=20, l2): its only same-label item is itself -> no match, left out
# top1 = 0/4, top2 = 3/4 (i=0, 2, 3), top3 = 4/4, mAP = (1/2 + 1/3 + 1/2 + 1/2)/4 = 11/24
# --------------------------------------------------------------------------- #

LOO_X = col(0, 3, 4, 10, 20)
LOO_LABELS = labels(0, 1, 0, 1, 2)


def test_leave_one_out_by_hand():
    result = retrieve(LOO_X, LOO_LABELS, LOO_X, LOO_LABELS, leave_one_out=True, topk=(1, 2, 3))
    assert result.has_match.tolist() == [True, True, True, True, False]
    expected_ap = [1 / 2, 1 / 3, 1 / 2, 1 / 2]
    assert result.average_precision[:4].tolist() == pytest.approx(expected_ap)
    out = result.summary()
    assert out["n_queries"] == 4
    assert out["top1"] == 0.0
    assert out["top2"] == pytest.approx(3 / 4)
    assert out["top3"] == 1.0
    assert out["mAP"] == pytest.approx(11 / 24)


def test_exclude_ranks_sampled_queries_against_the_whole_gallery_by_hand():
    # Items 1 and 3 of LOO_X query all five, each without its own row: item 1 (3, label 1)
    # ranks 4(0) 0(0) 10(1) 20(2): its one match at rank 3, AP 1/3; item 3 (10, label 1) ranks
    # 4(0) 3(1) 0(0) 20(2): AP 1/2, as leave-one-out gave them (rows 1 and 3 above).
    rows = torch.tensor([1, 3])
    result = retrieve(
        LOO_X[rows], LOO_LABELS[rows], LOO_X, LOO_LABELS, exclude=rows, topk=(1, 2, 3)
    )
    assert result.average_precision.tolist() == pytest.approx([1 / 3, 1 / 2])
    assert result.hits.tolist() == [[False, False, True], [False, True, True]]
    whole = retrieve(LOO_X, LOO_LABELS, LOO_X, LOO_LABELS, leave_one_out=True, topk=(1, 2, 3))
    assert torch.equal(result.average_precision, whole.average_precision[rows])
    # -1 leaves nothing out: the query finds its own row first.
    kept = retrieve(LOO_X[rows], LOO_LABELS[rows], LOO_X, LOO_LABELS, exclude=torch.tensor([-1, 3]))
    assert kept.hits[:, 0].tolist() == [True, False]


def test_exclude_is_checked():
    x, y = torch.zeros(3, 2), labels(0, 1, 0)
    with pytest.raises(ValueError, match="leave_one_out and exclude are one choice"):
        retrieve(x, y, x, y, leave_one_out=True, exclude=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=re.escape("exclude must be (3,) gallery rows in [-1, 3)")):
        retrieve(x, y, x, y, exclude=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=re.escape("exclude must be (3,) gallery rows")):
        retrieve(x, y, x, y, exclude=torch.tensor([0, 1]))


def test_without_leave_one_out_each_item_finds_itself():
    # Same data, self included: each query's own row is a match at distance 0 -> rank 1,
    # and i=4 now has a match (itself), so all 5 queries count and top1 = 1.
    out = evaluate_retrieval(LOO_X, LOO_LABELS, LOO_X, LOO_LABELS, topk=(1,))
    assert out["n_queries"] == 5
    assert out["top1"] == 1.0


def test_leave_one_out_excludes_self_even_with_exact_duplicates():
    # items 0 and 1 are the same point with the same label; item 2 is a non-match at distance 1.
    # i=0: others are item 1 (dist 0, match) and item 2 (dist 1) -> AP 1; same for i=1.
    # i=2 (label 1) has no other label-1 item -> left out.
    x = col(5, 5, 6)
    y = labels(0, 0, 1)
    result = retrieve(x, y, x, y, leave_one_out=True, topk=(1,))
    assert result.has_match.tolist() == [True, True, False]
    assert result.average_precision[:2].tolist() == [1.0, 1.0]
    assert result.summary()["n_queries"] == 2


# --------------------------------------------------------------------------- #
# Cosine versus L2
# --------------------------------------------------------------------------- #


def test_cosine_and_l2_rank_differently():
    # query (1, 0), label 0. Gallery:
    #   a = (10, 1) label 0: squared L2 81 + 1 = 82; cosine distance 1 - 10/sqrt(101) ~ 0.005
    #   b = (0, 1)  label 1: squared L2 1 + 1 = 2;   cosine distance 1 - 0 = 1
    #   c = (-3, 0) label 0: squared L2 16;          cosine distance 1 - (-1) = 2
    # L2 ranking b c a -> matches at ranks 2, 3: AP = (1/2 + 2/3) / 2 = 7/12, top1 miss
    # cosine ranking a b c -> matches at ranks 1, 3: AP = (1/1 + 2/3) / 2 = 5/6, top1 hit
    query = torch.tensor([[1.0, 0.0]])
    gallery = torch.tensor([[10.0, 1.0], [0.0, 1.0], [-3.0, 0.0]])
    gallery_labels = labels(0, 1, 0)
    l2 = retrieve(query, labels(0), gallery, gallery_labels, metric="l2", topk=(1,))
    cos = retrieve(query, labels(0), gallery, gallery_labels, metric="cosine", topk=(1,))
    assert l2.average_precision[0].item() == pytest.approx(7 / 12)
    assert not l2.hits[0, 0]
    assert cos.average_precision[0].item() == pytest.approx(5 / 6)
    assert cos.hits[0, 0]


def test_cosine_ignores_norm_so_scaled_copies_tie():
    # (1, 0) and (5, 0) have the same direction: cosine distance 0 from query (2, 0) for both.
    # The non-match (5, 0) wins the tie -> top1 miss, AP 1/2. Under L2: (1,0) is at 1, (5,0) at 9
    # -> the match ranks first, AP 1.
    query = torch.tensor([[2.0, 0.0]])
    gallery = torch.tensor([[1.0, 0.0], [5.0, 0.0]])
    gallery_labels = labels(0, 1)
    cos = retrieve(query, labels(0), gallery, gallery_labels, metric="cosine", topk=(1,))
    assert cos.average_precision[0].item() == pytest.approx(1 / 2)
    l2 = retrieve(query, labels(0), gallery, gallery_labels, metric="l2", topk=(1,))
    assert l2.average_precision[0].item() == 1.0


# --------------------------------------------------------------------------- #
# pairwise_distance
# --------------------------------------------------------------------------- #


def test_pairwise_distance_squared_l2_by_hand():
    query = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    gallery = torch.tensor([[3.0, 4.0], [1.0, 2.0], [-1.0, 0.0]])
    # q0=(1,2): (3,4): 2^2+2^2 = 8; (1,2): 0; (-1,0): 2^2+2^2 = 8
    # q1=(0,0): (3,4): 9+16 = 25; (1,2): 1+4 = 5; (-1,0): 1
    expected = torch.tensor([[8.0, 0.0, 8.0], [25.0, 5.0, 1.0]])
    d = pairwise_distance(query, gallery)
    assert d.shape == (2, 3)
    assert torch.allclose(d, expected, atol=1e-6)
    assert torch.allclose(pairwise_distance(query, gallery, "l2"), expected, atol=1e-6)
    assert (d >= 0).all()  # clamped: never negative from rounding


def test_pairwise_distance_cosine_by_hand():
    query = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    gallery = torch.tensor([[3.0, 4.0], [2.0, 4.0], [-1.0, 0.0]])
    s5 = math.sqrt(5)
    # q0 = (1,2)/sqrt5. (3,4)/5: cos = (3 + 8)/(5 sqrt5) -> 1 - 11/(5 sqrt5)
    #                   (2,4)/(2 sqrt5) = q0: cos 1     -> 0
    #                   (-1,0): cos = -1/sqrt5           -> 1 + 1/sqrt5
    # q1 = 0: normalises to the zero vector, cos 0 with everything -> 1
    expected = torch.tensor([[1 - 11 / (5 * s5), 0.0, 1 + 1 / s5], [1.0, 1.0, 1.0]])
    d = pairwise_distance(query, gallery, "cosine")
    assert torch.allclose(d, expected, atol=1e-6)


def test_pairwise_distance_cosine_normalises_each_query_row_on_its_own():
    # Two query rows of different norms (5 and 2): scaling all queries by one common norm would
    # keep each row's ranking but not its distances.
    query = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    gallery = torch.tensor([[6.0, 8.0], [1.0, 0.0], [0.0, -5.0]])
    # unit rows: q0 (0.6, 0.8), q1 (0, 1); g0 (0.6, 0.8), g1 (1, 0), g2 (0, -1)
    # q0: cos 1, 0.6, -0.8 -> 0, 0.4, 1.8;  q1: cos 0.8, 0, -1 -> 0.2, 1, 2
    expected = torch.tensor([[0.0, 0.4, 1.8], [0.2, 1.0, 2.0]])
    d = pairwise_distance(query, gallery, "cosine")
    assert torch.allclose(d, expected, atol=1e-6)


def test_pairwise_distance_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        pairwise_distance(torch.zeros(1, 2), torch.zeros(1, 2), "dot")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Chunking
# --------------------------------------------------------------------------- #


def _chunked_runs(query, query_labels, gallery, gallery_labels, **kwargs) -> list[RetrievalResult]:
    runs = [
        retrieve(
            query, query_labels, gallery, gallery_labels, chunk_size=c, topk=(1, 3, 5), **kwargs
        )
        for c in (1, 2, 1024)
    ]
    for elements in (1, 50):  # 1 // G = 0 -> one query at a time; 50 // 23 = 2 queries at a time
        runs.append(
            retrieve(
                query,
                query_labels,
                gallery,
                gallery_labels,
                max_chunk_elements=elements,
                topk=(1, 3, 5),
                **kwargs,
            )
        )
    return runs


def _assert_all_equal(runs: list[RetrievalResult]) -> None:
    ref = runs[0]
    assert ref.has_match.any()
    for r in runs[1:]:
        assert torch.equal(r.average_precision, ref.average_precision)
        assert torch.equal(r.hits, ref.hits)
        assert torch.equal(r.has_match, ref.has_match)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_chunking_does_not_change_results_l2_with_exact_ties(leave_one_out: bool):
    g = torch.Generator().manual_seed(0)
    # Small integer coordinates: squared L2 is exact in float32, so there are many exact ties,
    # which the tie rule must resolve the same way whatever the chunking.
    x = torch.randint(-2, 3, (23, 3), generator=g).float()
    y = torch.randint(0, 4, (23,), generator=g)
    if leave_one_out:
        runs = _chunked_runs(x, y, x, y, leave_one_out=True)
    else:
        runs = _chunked_runs(x[:9] + 1, y[:9], x, y)
    _assert_all_equal(runs)


class ChunkSpy:
    """pairwise_distance that records the query chunks it is given, in order, and still computes."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __call__(self, query, gallery, metric="l2"):
        self.batches.append(query.clone())
        return pairwise_distance(query, gallery, metric)


@pytest.mark.parametrize(
    "n_gallery, chunk_size, max_chunk_elements, sizes",
    [
        (3, 1024, 6, [2, 2, 2, 1]),  # 6 // 3 = 2 queries fit the budget
        (3, 1024, 2, [1] * 7),  # not even one query fits: one at a time, never zero
        (1, 1024, 4, [4, 3]),  # a one-item gallery: 4 // 1 = 4 queries fit
        (2, 3, 100, [3, 3, 1]),  # chunk_size caps the chunk below the budget
    ],
)
def test_queries_are_ranked_once_each_in_the_largest_chunks_that_fit(
    n_gallery: int, chunk_size: int, max_chunk_elements: int, sizes: list[int]
):
    # Results do not depend on the chunking (tests above), so the chunks themselves are
    # checked: a chunk of distances holds at most max_chunk_elements once one query fits, and
    # no query is ranked twice.
    query, spy = col(*range(7)), ChunkSpy()
    retrieve(
        query,
        labels(*[0] * 7),
        col(*range(n_gallery)),
        labels(*[0] * n_gallery),
        chunk_size=chunk_size,
        max_chunk_elements=max_chunk_elements,
        distance=spy,
    )
    batches = spy.batches
    assert [len(b) for b in batches] == sizes
    assert torch.equal(torch.cat(batches), query)


@pytest.mark.parametrize("leave_one_out", [False, True])
def test_chunking_does_not_change_results_cosine(leave_one_out: bool):
    # Continuous data (no mathematically tied cosines: those are only equal up to float32
    # rounding, which depends on the matmul's shape).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, 3, generator=g)
    y = torch.randint(0, 4, (23,), generator=g)
    if leave_one_out:
        runs = _chunked_runs(x, y, x, y, leave_one_out=True, metric="cosine")
    else:
        runs = _chunked_runs(x[:9] + 0.1, y[:9], x, y, metric="cosine")
    _assert_all_equal(runs)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #


def exactly(message: str) -> str:
    """A `match` pattern for the whole of `message`, taken literally."""
    return f"^{re.escape(message)}$"


def test_nan_in_gallery_names_gallery_and_its_first_bad_row():
    # Row 0 is finite, row 1 partly and row 2 wholly NaN: the row named is the first with a
    # non-finite entry (not the first with a finite one, nor the last bad one).
    gallery = torch.tensor([[0.0, 1.0], [float("nan"), 0.0], [float("nan"), float("nan")]])
    message = (
        "retrieval: gallery embeddings contain NaN or Inf (first at row 1); expected finite vectors"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve(torch.zeros(1, 2), labels(0), gallery, labels(0, 1, 0))


def test_inf_in_query_names_query():
    query = torch.tensor([[float("inf"), 0.0]])
    message = (
        "retrieval: query embeddings contain NaN or Inf (first at row 0); expected finite vectors"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve(query, labels(0), torch.zeros(2, 2), labels(0, 1))


def test_dimension_mismatch_names_both_shapes():
    message = "retrieval: query (2, 3) and gallery (4, 2) must be (N, D) with one D"
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve(torch.zeros(2, 3), labels(0, 1), torch.zeros(4, 2), labels(0, 1, 0, 1))


def test_query_must_be_a_matrix():
    message = "retrieval: query (3,) and gallery (4, 3) must be (N, D) with one D"
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve(torch.zeros(3), labels(0, 1, 0), torch.zeros(4, 3), labels(0, 1, 0, 1))


def test_leave_one_out_needs_same_length():
    message = "retrieval: leave_one_out needs the query set to be the gallery (same length)"
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve(
            torch.zeros(2, 2), labels(0, 1), torch.zeros(3, 2), labels(0, 1, 0), leave_one_out=True
        )


# --------------------------------------------------------------------------- #
# retrieve_mixed: every mixed gallery at once, checked against `retrieve` on each one
# --------------------------------------------------------------------------- #


def _mixed_case(seed, *, n_query, n_gallery, n_classes, ints, leave_one_out, n_points, n_sched):
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        # Small integer coordinates make many exact distance ties, within and across versions.
        if ints:
            return torch.randint(0, 3, (n, 3), generator=g).float()
        return torch.randn(n, 3, generator=g)

    first, second = draw(n_gallery), draw(n_gallery)
    labels = torch.randint(0, n_classes, (n_gallery,), generator=g)
    if leave_one_out:
        query, query_labels = second.clone(), labels.clone()
    else:  # one label the gallery never has: queries without a match
        query, query_labels = (
            draw(n_query),
            torch.randint(0, n_classes + 1, (n_query,), generator=g),
        )
    switch = torch.randint(0, n_points + 1, (n_sched, n_gallery), generator=g)
    return query, query_labels, first, second, labels, switch


@pytest.mark.parametrize(
    "seed, ints, leave_one_out, metric",
    [
        (0, False, False, "l2"),
        (1, True, False, "l2"),
        (2, True, True, "l2"),
        (3, True, True, "l2"),
        # Cosine only on random vectors: with exact ties, cosine distances computed against
        # differently shaped galleries may differ in the last bit and break a tie either way.
        (4, False, True, "cosine"),
        (5, False, False, "cosine"),
    ],
)
def test_retrieve_mixed_equals_retrieve_on_every_mixed_gallery(seed, ints, leave_one_out, metric):
    n_points, n_sched = 6, 2
    query, query_labels, first, second, labels, switch = _mixed_case(
        seed,
        n_query=30,
        n_gallery=30,
        n_classes=3,
        ints=ints,
        leave_one_out=leave_one_out,
        n_points=n_points,
        n_sched=n_sched,
    )
    # a small element budget forces several query chunks
    got = retrieve_mixed(
        query,
        query_labels,
        first,
        second,
        labels,
        switch,
        n_points,
        leave_one_out=leave_one_out,
        metric=metric,
        topk=(1, 3),
        max_chunk_elements=500,
    )
    assert len(got) == n_sched and all(len(r) == n_points for r in got)
    for o in range(n_sched):
        for p in range(n_points):
            gallery = torch.where((switch[o] <= p)[:, None], second, first)
            want = retrieve(
                query,
                query_labels,
                gallery,
                labels,
                leave_one_out=leave_one_out,
                metric=metric,
                topk=(1, 3),
            )
            assert torch.equal(got[o][p].has_match, want.has_match)
            assert torch.equal(got[o][p].hits, want.hits)
            assert torch.allclose(got[o][p].average_precision, want.average_precision, atol=1e-6)


def test_retrieve_mixed_by_hand():
    # 1-D, two items of class 0 and one of class 1; one query at 0 with label 0.
    # first versions: 5, 1, 2 (labels 0, 0, 1); second versions: 0, 9, 3.
    # point 0 (all first): 1 (match), 2 (miss), 5 (match) -> AP = (1/1 + 2/3) / 2 = 5/6
    # point 1 (item 0 switched): 0 (match), 1 (match), 2 -> AP = 1
    # point 2 (items 0, 2 switched): 0, 1, 3 -> AP = 1; the schedule never switches item 1
    first = torch.tensor([[5.0], [1.0], [2.0]])
    second = torch.tensor([[0.0], [9.0], [3.0]])
    labels = torch.tensor([0, 0, 1])
    switch = torch.tensor([[1, 3, 2]])
    got = retrieve_mixed(torch.zeros(1, 1), torch.tensor([0]), first, second, labels, switch, 3)
    assert [float(r.average_precision[0]) for r in got[0]] == pytest.approx([5 / 6, 1.0, 1.0])
    assert [bool(r.hits[0, 0]) for r in got[0]] == [True, True, True]


def test_retrieve_mixed_errors():
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 0])
    with pytest.raises(ValueError, match="one shape"):
        retrieve_mixed(x, y, x, torch.zeros(3, 3), y, torch.zeros(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"switch must be \(schedules, 3\)"):
        retrieve_mixed(x, y, x, x, y, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"switch points must lie in \[0, 2\]"):
        retrieve_mixed(x, y, x, x, y, torch.full((1, 3), 3), 2)
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="gallery embeddings contain NaN or Inf .first at row 1"):
        retrieve_mixed(x, y, x, bad, y, torch.zeros(1, 3, dtype=torch.long), 2)


def _mixed(query, first, second=None, **kwargs):
    """retrieve_mixed over one gallery in two versions (`second` defaults to `first`), labels
    alternating 0, 1, ..., no item switched: the call the refusal tests vary one input of."""
    second = first if second is None else second
    n_query, n_gallery = query.shape[0], first.shape[0]
    return retrieve_mixed(
        query,
        torch.arange(n_query) % 2,
        first,
        second,
        torch.arange(n_gallery) % 2,
        torch.zeros(1, n_gallery, dtype=torch.long),
        2,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("query", "gallery", "kwargs", "message"),
    [
        # Both are matrices, only their widths differ: that alone must be refused.
        ((2, 3), (4, 2), {}, "query (2, 3) and gallery (4, 2) must be (N, D) with one D"),
        # The gallery is a matrix, only the query is not: that alone must be refused.
        ((3,), (4, 3), {}, "query (3,) and gallery (4, 3) must be (N, D) with one D"),
        (
            (2, 2),
            (3, 2),
            {"leave_one_out": True},
            "leave_one_out needs the query set to be the gallery (same length)",
        ),
    ],
)
def test_retrieve_mixed_refuses_shapes_that_cannot_be_ranked(query, gallery, kwargs, message):
    with pytest.raises(ValueError, match=exactly(f"retrieval: {message}")):
        _mixed(torch.zeros(query), torch.zeros(gallery), **kwargs)


@pytest.mark.parametrize("bad", ["query", "first", "second"])
def test_retrieve_mixed_nan_names_the_set_and_its_first_bad_row(bad: str):
    # Either gallery version is "the gallery" to the user; the query set is named apart.
    tensors = {name: torch.zeros(3, 2) for name in ("query", "first", "second")}
    tensors[bad][1, 0] = float("nan")
    name = "query" if bad == "query" else "gallery"
    message = (
        f"retrieval: {name} embeddings contain NaN or Inf (first at row 1); expected finite vectors"
    )
    with pytest.raises(ValueError, match=exactly(message)):
        _mixed(tensors["query"], tensors["first"], tensors["second"])


def test_retrieve_mixed_refuses_a_gallery_of_2_to_the_30_items():
    # Sort keys keep the item index in 30 bits, so 2^30 items is one too many. Zero-width
    # embeddings and no schedules make such a gallery cost no memory. leave_one_out with one
    # query is a tripwire: were the size not checked first, the length check would refuse the
    # call with another message instead of ranking 2^30 items.
    n = 1 << 30
    message = f"retrieval: a mixed gallery holds at most 2^30 items, got {n}"
    gallery = torch.zeros(n, 0)
    with pytest.raises(ValueError, match=exactly(message)):
        retrieve_mixed(
            torch.zeros(1, 0),
            labels(0),
            gallery,
            gallery,
            labels(0),
            torch.zeros(0, n, dtype=torch.long),
            2,
            leave_one_out=True,
        )


def test_retrieve_mixed_returns_bool_hits_like_retrieve():
    # RetrievalResult.hits is a bool tensor (retrieve's is); 1.0 == True would hide float hits.
    got = retrieve_mixed(
        col(0), labels(0), col(1, 2), col(3, 4), labels(0, 1), torch.tensor([[1, 2]]), 2
    )
    for result in got[0]:
        assert result.hits.dtype == torch.bool
        assert result.has_match.dtype == torch.bool
        assert result.average_precision.dtype == torch.float32


def test_retrieve_mixed_empty_gallery_has_no_matches():
    # No items at all: every query of every gallery has no match, AP 0 and no hit.
    got = retrieve_mixed(
        col(0, 1), labels(0, 1), col(), col(), labels(), torch.zeros(2, 0, dtype=torch.long), 2
    )
    assert len(got) == 2 and all(len(r) == 2 for r in got)
    for result in itertools.chain.from_iterable(got):
        assert result.has_match.tolist() == [False, False]
        assert result.average_precision.tolist() == [0.0, 0.0]
        assert result.hits.tolist() == [[False, False], [False, False]]


def test_retrieve_mixed_distances_near_zero_keep_their_order():
    # As for retrieve: the first versions' squared distances 2^-28 (the match) and 2^-26 (the
    # non-match) would both round to 1 if shifted by 1 before the sort, and the tie would rank
    # the non-match first (AP 1/2). The second versions (far away) never enter.
    got = retrieve_mixed(
        col(0),
        labels(0),
        col(2**-14, 2**-13),
        col(3, 4),
        labels(0, 1),
        torch.tensor([[1, 1]]),
        1,
        topk=(1,),
    )
    assert got[0][0].hits.tolist() == [[True]]
    assert got[0][0].average_precision.tolist() == [1.0]


def test_retrieve_mixed_ap_is_summed_in_float64():
    # Query 0, label A; items A A B B A. Point 0 holds the first versions at 1, 2, 3, 4, 5:
    # matches at ranks 1, 2, 5, AP = (1 + 2/2 + 3/5) / 3 = 13/15. Point 1 holds the second
    # versions at 3, 4, 1, 2, 5: matches at ranks 3, 4, 5, AP = (1/3 + 2/4 + 3/5) / 3 = 43/90.
    # Summed in float64, each AP is the float32 value nearest the exact one. Summed in float32,
    # in any order, the three float32 precisions lose a bit (e.g. 2 + 0.6 rounds down) and the
    # APs end one float32 step off (13/15 below, 43/90 above).
    got = retrieve_mixed(
        col(0),
        labels(0),
        col(1, 2, 3, 4, 5),
        col(3, 4, 1, 2, 5),
        labels(0, 0, 1, 1, 0),
        torch.ones(1, 5, dtype=torch.long),
        2,
    )
    nearest = torch.tensor([13 / 15, 43 / 90], dtype=torch.float32)
    assert torch.equal(torch.cat([r.average_precision for r in got[0]]), nearest)


@pytest.mark.parametrize(
    "gallery_labels, n_points, max_chunk_elements, sizes",
    [
        # 3 items, 2 of one class, 2 points: max(2 * 3 keys, (2 * 2 + 1) * (2 + 1) counts) = 15
        ((0, 0, 1), 2, 30, [2, 2, 2, 1]),  # 30 // 15 = 2 queries fit the budget
        ((0, 0, 1), 2, 10, [1] * 7),  # not even one query fits: one at a time, never zero
        # 4 items of 4 classes, 1 point: the 2 * 4 = 8 keys outweigh the (2 + 1) * 2 = 6 counts
        ((0, 1, 2, 3), 1, 24, [3, 3, 1]),  # 24 // 8 = 3
        # no items, 2 points: 2 + 1 counts per query
        ((), 2, 6, [2, 2, 2, 1]),  # 6 // 3 = 2
        # no items, no points: one count per query
        ((), 0, 2, [2, 2, 2, 1]),  # 2 // 1 = 2
    ],
)
def test_retrieve_mixed_ranks_queries_once_each_in_the_largest_chunks_that_fit(
    gallery_labels, n_points: int, max_chunk_elements: int, sizes: list[int]
):
    # Results do not depend on the chunking (test_retrieve_mixed_equals_retrieve_... runs
    # several chunks), so the chunks themselves are checked against the rule in retrieve_mixed:
    # a query costs max(2G sort keys, (2 * largest class + 1) * (points + 1) counts), as many
    # queries as fit max_chunk_elements go together (at least one), and each chunk ranks both
    # gallery versions once, no query twice.
    query, spy = col(*range(7)), ChunkSpy()
    n = len(gallery_labels)
    retrieve_mixed(
        query,
        labels(*[0] * 7),
        col(*range(n)),
        col(*range(n)) + 0.5,
        labels(*gallery_labels),
        torch.zeros(1, n, dtype=torch.long),
        n_points,
        max_chunk_elements=max_chunk_elements,
        distance=spy,
    )
    firsts, seconds = spy.batches[0::2], spy.batches[1::2]
    assert [len(b) for b in firsts] == sizes
    assert all(torch.equal(a, b) for a, b in zip(firsts, seconds, strict=True))
    assert torch.equal(torch.cat(firsts), query)


def test_retrieve_mixed_counts_no_hit_for_a_query_without_a_match_at_any_k():
    # Two gallery items; query 0 matches item 0, query 1 (label 7) matches nothing. With k up to
    # 4 > G = 2, `retrieve` reports no hit for query 1 at any k; retrieve_mixed used to report
    # hits at k >= G + 1 when another query of its chunk had a match.
    query = torch.tensor([[0.0, 0.0], [5.0, 5.0]])
    query_labels = torch.tensor([1, 7])
    first = torch.tensor([[0.1, 0.0], [3.0, 3.0]])
    second = torch.tensor([[0.0, 0.1], [3.0, 2.9]])
    gallery_labels = torch.tensor([1, 2])
    switch = torch.tensor([[0, 1]])  # item 0 switched at point 0, item 1 at point 1
    topk = (1, 2, 3, 4)
    results = retrieve_mixed(
        query, query_labels, first, second, gallery_labels, switch, 2, topk=topk
    )
    for p, gallery in enumerate([torch.stack([second[0], first[1]]), second]):
        expected = retrieve(query, query_labels, gallery, gallery_labels, topk=topk)
        got = results[0][p]
        assert got.hits[1].tolist() == [False, False, False, False]
        assert torch.equal(got.hits, expected.hits)
        assert got.has_match.tolist() == [True, False]


def test_retrieve_mixed_a_match_ranked_last_is_a_hit_only_at_k_of_the_gallery_size():
    # G = 2: the query's only match (item 1) is ranked 2nd at both points, behind item 0. Hits at
    # k = 1 must be False and at k = 2 True, as `retrieve` says; each result carries its topk.
    query = torch.tensor([[0.0, 0.0]])
    query_labels = torch.tensor([4])
    first = torch.tensor([[0.1, 0.0], [2.0, 0.0]])
    second = torch.tensor([[0.0, 0.1], [0.0, 2.0]])
    gallery_labels = torch.tensor([3, 4])
    switch = torch.tensor([[1, 0]])  # item 1 switched at point 0, item 0 at point 1
    results = retrieve_mixed(
        query, query_labels, first, second, gallery_labels, switch, 2, topk=(1, 2)
    )
    for p in range(2):
        assert results[0][p].hits.tolist() == [[False, True]]
        assert results[0][p].topk == (1, 2)
        assert results[0][p].summary()["top1"] == 0.0
