"""DP federated statistics on the real OULAD data: noise calibration, suppression, refusals, budget, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
from campus_contexts import campus_context
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import RDPAccountant
from scipy.stats import chi2, norm

from edufl.clients.app import query_handler, train_handler
from edufl.clients.guard import release_guard
from edufl.federation import statistics
from edufl.federation.audit import AuditLog
from edufl.federation.fingerprint import dataset_id
from edufl.federation.ledger import PrivacyLedger
from edufl.federation.models import build_model, model_arrays
from edufl.federation.partition import campus_slices
from edufl.federation.policy import CampusPolicy
from edufl.federation.privacy import epsilon
from edufl.federation.proto.analytics_pb2 import Cell, StatisticAnswer, StatisticQuery
from edufl.federation.queries import ANSWER, QUERY_KEY, QueryError, cells, load_query
from edufl.federation.randomness import SECRET, Randomness
from edufl.federation.runconfig import RunConfig
from edufl.federation.schema import load_schema
from edufl.federation.statistics import answer, answer_problems, exact_cells, noise, noise_multiplier, records
from edufl.federation.tables import load_tables
from edufl.federation.tasks import feature_names
from edufl.federation.wire import ARRAYS, BLOCKED, CONFIG, REFUSED
from edufl.server.combine import Z_95, combine

OULAD = load_schema()
"""OULAD's federation schema (federation/schemas/oulad.toml)."""

ROOT = Path(__file__).parents[1]
WITHDRAWAL_BY_IMD = StatisticQuery(
    name="w", statistic="mean", value="final_result=Withdrawn", low=0, high=1, group_by=["imd_band"], epsilon=1.0, delta=1e-5
)
SCORE_BY_TYPE = ROOT / "experiments" / "queries" / "score_by_assessment_type.toml"
WITHDRAWAL_FILE = ROOT / "experiments" / "queries" / "withdrawal_by_imd.toml"


@pytest.mark.parametrize("eps", [0.5, 1.0, 3.0])
def test_noise_scale_matches_the_stated_epsilon_and_sensitivity(eps):
    credits = StatisticQuery(name="c", statistic="mean", value="studied_credits", low=0, high=360, epsilon=eps, delta=1e-5)
    z = noise_multiplier(credits)
    assert astuple(noise(credits, z)) == pytest.approx(
        (z, z * math.sqrt(2), z * math.sqrt(2) * 360)
    )  # Δ = √2 for (count, sum / B), B = 360
    count = StatisticQuery(name="n", statistic="count", group_by=["region"], epsilon=eps, delta=1e-5)
    assert astuple(noise(count, noise_multiplier(count))) == (z, z, 0.0)  # Δ = 1 for counts alone
    accountant = RDPAccountant()  # Opacus's own accountant: a Gaussian release is one step at q = 1
    accountant.history = [(z, 1.0, 1)]
    assert eps - 0.01 <= accountant.get_epsilon(1e-5) <= eps  # Opacus's calibration tolerance
    # and a slightly smaller z would spend more than the stated ε: the noise is not larger than it needs to be
    accountant.history = [(z * 0.98, 1.0, 1)]
    assert accountant.get_epsilon(1e-5) > eps - 0.01


def test_empirical_noise_matches_the_stated_std(aaa):
    exact = exact_cells(WITHDRAWAL_BY_IMD, aaa, OULAD)
    big = [key for key, (n, _) in exact.items() if n >= 60]  # never near k = 10: suppression cannot bias the residuals
    assert len(big) >= 5
    z = noise_multiplier(WITHDRAWAL_BY_IMD)
    count_res, sum_res = [], []
    for seed in range(200):  # reproducible noise: the test is deterministic
        reply = answer(WITHDRAWAL_BY_IMD, aaa, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=seed))
        got = {(tuple(c.group), c.bin): c for c in reply.cells}
        for key in big:
            count_res.append(got[key].noisy_count - exact[key][0])
            sum_res.append(got[key].noisy_sum - exact[key][1])
    stated = noise(WITHDRAWAL_BY_IMD, z)
    assert reply.count_std == stated.count_std and reply.sum_std == stated.sum_std
    for res, std in ((np.array(count_res), stated.count_std), (np.array(sum_res), stated.sum_std)):
        assert abs(res.std() / std - 1) < 0.10, (res.std(), std)  # ≥ 1000 draws: the sample std is within ~2 %
        assert abs(res.mean()) < 4 * std / math.sqrt(len(res))  # unbiased


def test_secret_noise_is_fresh_in_every_release_and_has_the_stated_std(tables):
    # The campus default (SECRET: OpenDP's Gaussian) cannot be seeded, so this test is statistical; its failure
    # chance is computed below and asserted < 1e-6.
    query = StatisticQuery(
        name="credits",
        statistic="mean",
        value="studied_credits",
        low=0,
        high=360,
        group_by=["region", "imd_band"],
        epsilon=1.0,
        delta=1e-5,
    )
    exact = exact_cells(query, tables, OULAD)
    big = [key for key, (n, _) in exact.items() if n >= 60]  # suppressed only if its noise is below -50, -8.7 stds
    assert len(big) >= 120
    z = noise_multiplier(query)
    stated = noise(query, z)
    replies = [answer(query, tables, "all", z, 10, schema=OULAD) for _ in range(25)]  # randomness: the default, SECRET
    first, second = ({(tuple(c.group), c.bin): c for c in reply.cells} for reply in replies[:2])
    assert all(
        first[key].noisy_count != second[key].noisy_count and first[key].noisy_sum != second[key].noisy_sum for key in big
    )  # not reproducible: the same query on the same rows gets fresh noise
    count_res, sum_res = [], []
    for reply in replies:
        assert (reply.count_std, reply.sum_std) == (stated.count_std, stated.sum_std)
        got = {(tuple(c.group), c.bin): c for c in reply.cells}
        for key in big:
            count_res.append(got[key].noisy_count - exact[key][0])
            sum_res.append(got[key].noisy_sum - exact[key][1])
    n = len(count_res)
    assert n >= 3000
    # The noise is N(0, std²), so n·(rms / std)² is χ² with n degrees of freedom: rms / std is outside [0.9, 1.1]
    # with the probability below; the mean is outside 5.5 std / √n with P = 3.8e-8. Four checks (counts, sums).
    failure = 2 * (chi2.cdf(0.81 * n, n) + chi2.sf(1.21 * n, n) + 2 * norm.sf(5.5))
    assert failure < 1e-6  # 7.6e-8 at n = 3,225; the suppression of a big cell adds below 1e-13
    for res, std in ((np.array(count_res), stated.count_std), (np.array(sum_res), stated.sum_std)):
        assert abs(math.sqrt(np.mean(res**2)) / std - 1) < 0.10, (res.std(), std)  # the std about the known mean 0
        assert abs(res.mean()) < 5.5 * std / math.sqrt(len(res))  # unbiased


def test_seeded_noise_is_reproducible(aaa):
    z = noise_multiplier(WITHDRAWAL_BY_IMD)
    one, two = (answer(WITHDRAWAL_BY_IMD, aaa, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=11)) for _ in range(2))
    assert len(one.cells) >= 5 and one.SerializeToString() == two.SerializeToString()
    other = answer(WITHDRAWAL_BY_IMD, aaa, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=12))
    assert [c.noisy_count for c in other.cells] != [c.noisy_count for c in one.cells]


def test_the_noise_is_one_release_of_counts_and_sums_over_b(aaa, monkeypatch):
    calls = []
    real = statistics.add_gaussian

    def spy(values, sensitivity, std, randomness=SECRET):
        noisy, rho = real(values, sensitivity, std, randomness)
        calls.append((np.array(values), sensitivity, std, randomness, noisy, rho))
        return noisy, rho

    monkeypatch.setattr(statistics, "add_gaussian", spy)
    credits = StatisticQuery(
        name="credits",
        statistic="mean",
        value="studied_credits",
        low=-20,
        high=360,
        group_by=["imd_band"],
        epsilon=1.0,
        delta=1e-5,
    )
    z = noise_multiplier(credits)
    reply = answer(credits, aaa, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=3))
    [(values, sensitivity, std, randomness, noisy, rho)] = calls  # one call over the whole released vector
    exact = exact_cells(credits, aaa, OULAD)
    assert values.tolist() == [float(n) for n, _ in exact.values()] + [s / 360 for _, s in exact.values()]  # B = 360
    assert sensitivity == math.sqrt(2) and std == noise(credits, z).count_std == reply.count_std  # Δ = √2·m
    assert randomness == Randomness(seed=3) and rho == pytest.approx(1 / (2 * z**2), rel=1e-12)
    got = {(tuple(c.group), c.bin): c for c in reply.cells}
    assert len(got) >= 5
    for i, key in enumerate(exact):  # the noisy sums / B, times B: sum noise of std z·Δ·B, as stated
        if key in got:
            assert (got[key].noisy_count, got[key].noisy_sum) == (noisy[i], noisy[len(exact) + i] * 360)
    assert std * 360 == reply.sum_std == noise(credits, z).sum_std
    # Counts alone (a quantile's histogram, m = 14): Δ = m, and the campus default is the secret source.
    calls.clear()
    scores = load_query(SCORE_BY_TYPE)
    z = noise_multiplier(scores)
    answer(scores, aaa, "AAA", z, 10, schema=OULAD)
    [(values, sensitivity, std, randomness, _, rho)] = calls
    assert len(values) == len(cells(scores, OULAD)) and sensitivity == 14 and randomness is SECRET
    assert std == noise(scores, z).count_std and rho == pytest.approx(1 / (2 * z**2), rel=1e-12)


@pytest.mark.parametrize("excess", [1e-9, 0.5, math.nan])
def test_an_answer_fails_closed_when_the_noise_costs_more_than_the_ledger_records(aaa, monkeypatch, excess):
    real = statistics.add_gaussian

    def overspending(values, sensitivity, std, randomness=SECRET):
        noisy, rho = real(values, sensitivity, std, randomness)
        return noisy, rho * (1 + excess)

    monkeypatch.setattr(statistics, "add_gaussian", overspending)
    reply = None
    with pytest.raises(QueryError, match=r"exceeds the ledger's 1 / \(2 z²\)"):
        reply = answer(WITHDRAWAL_BY_IMD, aaa, "AAA", noise_multiplier(WITHDRAWAL_BY_IMD), 10, schema=OULAD)
    assert reply is None  # no answer


def test_the_campus_sends_nothing_when_the_noise_costs_more_than_the_ledger_records(aaa_dir, task_identity, monkeypatch):
    real = statistics.add_gaussian
    monkeypatch.setattr(statistics, "add_gaussian", lambda *args: (real(*args)[0], math.inf))
    reply = release_guard(_request(WITHDRAWAL_BY_IMD), campus_context(aaa_dir), query_handler)
    assert reply.has_error() and not reply.has_content()
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and "exceeds the ledger's" in record.reason


def test_float_rounding_of_rho_is_not_an_overspend(aaa, monkeypatch):
    real = statistics.add_gaussian

    def rounded_up(values, sensitivity, std, randomness=SECRET):
        noisy, rho = real(values, sensitivity, std, randomness)
        return noisy, rho * (1 + 1e-13)  # within the 1e-12 relative slack

    monkeypatch.setattr(statistics, "add_gaussian", rounded_up)
    z = noise_multiplier(WITHDRAWAL_BY_IMD)
    reply = answer(WITHDRAWAL_BY_IMD, aaa, "AAA", z, 10, schema=OULAD, randomness=Randomness(seed=4))
    assert len(reply.cells) >= 5


def test_small_cells_are_suppressed(aaa):
    query = StatisticQuery(name="fine", statistic="count", group_by=["region", "imd_band", "age_band"], epsilon=1.0, delta=1e-5)
    exact = exact_cells(query, aaa, OULAD)
    reply = answer(query, aaa, "AAA", noise_multiplier(query), 10, schema=OULAD, randomness=Randomness(seed=1))
    released = {(tuple(c.group), c.bin) for c in reply.cells}
    # region and age_band are nullable since contract 1.2: each has a "missing" group too.
    assert len(released) + reply.suppressed_cells == len(cells(query, OULAD)) == 14 * 11 * 4
    assert all(c.noisy_count >= 10 for c in reply.cells) and reply.min_cell_count == 10
    empty = [key for key, (n, _) in exact.items() if n == 0]
    # An empty cell is released only when its noise alone reaches k: P(N(0, 4.06²) ≥ 10) = 0.7 %, about 4 of 580.
    assert len(empty) > 150 and sum(key in released for key in empty) <= 8
    assert all(key in released for key, (n, _) in exact.items() if n >= 40)


def test_submission_statistics_scale_the_noise_by_the_rows_per_registration():
    query = load_query(SCORE_BY_TYPE)  # m = 14 submissions per registration
    z = noise_multiplier(query)
    assert query.max_rows_per_registration == 14
    assert astuple(noise(query, z)) == pytest.approx((z, 14 * z, 0.0))  # Δ = m for counts
    mean = StatisticQuery(
        name="s",
        statistic="mean",
        value="score",
        low=0,
        high=100,
        group_by=["assessment_type"],
        max_rows_per_registration=14,
        epsilon=1.0,
        delta=1e-5,
    )
    assert astuple(noise(mean, z)) == pytest.approx((z, 14 * math.sqrt(2) * z, 14 * math.sqrt(2) * 100 * z))  # Δ = √2·m


def test_a_registration_contributes_at_most_m_submissions(aaa):
    query = StatisticQuery(
        name="s",
        statistic="histogram",
        value="score",
        bin_edges=[0, 40, 70, 100],
        group_by=["assessment_type", "imd_band"],
        max_rows_per_registration=3,
        epsilon=1.0,
        delta=1e-5,
    )
    key = ["course", "presentation", "student_id"]
    kept = records(query, aaa)
    per_registration = kept.groupby(key).size()
    assert per_registration.max() == 3 and len(per_registration) > 300
    submitted = aaa["submissions"].merge(aaa["assessments"][["assessment_id", "course", "presentation"]], on="assessment_id")
    submitted = submitted[submitted["score"].notna()]
    assert len(kept) == submitted.groupby(key).size().clip(upper=3).sum()  # each keeps min(its scored rows, m)
    # Sensitivity on the real rows: removing the registration with the most submissions moves the counts by m in all.
    busiest = submitted.groupby(key).size().idxmax()
    assert submitted.groupby(key).size().max() > 3
    without = {name: frame for name, frame in aaa.frames.items()}
    for name in ("learners", "registrations"):
        frame = aaa[name]
        without[name] = frame[~(frame[key] == list(busiest)).all(axis=1)]
    own = aaa["assessments"][(aaa["assessments"][["course", "presentation"]] == list(busiest[:2])).all(axis=1)]["assessment_id"]
    subs = aaa["submissions"]
    without["submissions"] = subs[~((subs["student_id"] == busiest[2]) & subs["assessment_id"].isin(own))]
    full, less = exact_cells(query, aaa, OULAD), exact_cells(query, without, OULAD)
    assert sum(abs(full[c][0] - less[c][0]) for c in full) == 3
    # and the campus's threshold is k·m records: a cell of fewer than 10 × 3 noisy submissions may not leave
    reply = answer(query, aaa, "AAA", noise_multiplier(query), 10, schema=OULAD, randomness=Randomness(seed=2))
    assert all(c.noisy_count >= 30 for c in reply.cells) and answer_problems(query, reply, 10, OULAD) == []
    reply.cells[0].noisy_count = 25.0
    assert "below release.min_cohort_size 10 × max_rows_per_registration 3" in answer_problems(query, reply, 10, OULAD)[0]


def _true_quantiles(query: StatisticQuery, tables) -> dict[tuple[str, ...], np.ndarray]:
    rows = records(query, tables)
    value = rows[query.value].astype(float).clip(query.low, query.high)
    groups = rows.groupby(list(query.group_by)) if query.group_by else [((), rows)]
    return {
        (g if isinstance(g, tuple) else (g,)): np.quantile(value[r.index], list(query.quantiles), method="inverted_cdf")
        for g, r in groups
    }


@pytest.mark.parametrize(
    "query",
    [
        StatisticQuery(
            name="credits",
            statistic="quantile",
            value="studied_credits",
            low=0,
            high=360,
            bins=36,
            quantiles=[0.25, 0.5, 0.75],
            epsilon=1.0,
            delta=1e-5,
        ),
        SCORE_BY_TYPE,
    ],
    ids=["median-credits", "score-by-assessment-type"],
)
def test_quantiles_are_within_their_stated_bound_of_the_true_quantiles(tables, query):
    query = load_query(query) if isinstance(query, Path) else query
    answers = [
        answer(query, own, name, noise_multiplier(query), 10, schema=OULAD, randomness=Randomness(seed=seed))
        for seed, (name, own) in enumerate(campus_slices(tables, "module").items())
    ]
    estimates = combine(query, answers, OULAD)
    truth = _true_quantiles(query, tables)
    assert len(estimates) == len(truth) * len(query.quantiles)
    width = (query.high - query.low) / query.bins
    for e in estimates:
        true = truth[e.group][list(query.quantiles).index(e.p)]
        assert abs(e.estimate - true) <= e.bound95, (e, true)
        assert width <= e.bound95 <= width + 6 * e.std + 1e-9  # resolution plus the noise's 95th percentile
    if query.statistic == "quantile" and query.group_by:
        exam = [e for e in estimates if e.group == ("Exam",)]
        assert all(e.std > 0.3 for e in exam)  # the smallest group carries visible noise at m = 14


# --- the campus: the ClientApp's query handler behind the release guard ---------------------------------------------


def _request(query: StatisticQuery, run: str = "q1") -> Message:
    config = ConfigRecord({"run-name": run, "server-round": 1, QUERY_KEY: query.SerializeToString(), "contract-version": "1.1"})
    return Message(RecordDict({CONFIG: config}), dst_node_id=1, message_type="query")


def _policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(group_by=["student_id"]), "group_by: field 'student_id' is not a categorical field of the data contract"),
        (dict(value="studied_credits", low=0, high=math.inf), "a mean needs finite clipping bounds"),
        (dict(value="studied_credits", low=0, high=0), "an unbounded sum is refused"),
        (dict(value="shoe_size"), "value: 'shoe_size' is not a numeric contract field"),
        (dict(value="final_result=Withdrawn", low=0, high=5), "an indicator's bounds are low = 0, high = 1"),
        (
            dict(statistic="quantile", value="studied_credits", low=0, high=math.inf, bins=10, quantiles=[0.5]),
            "a quantile needs finite clipping bounds",
        ),
        (
            dict(statistic="quantile", value="studied_credits", low=0, high=0, bins=10, quantiles=[0.5]),
            "an unbounded range is refused",
        ),
        (
            dict(statistic="quantile", value="studied_credits", low=0, high=360, quantiles=[0.5]),
            "a quantile needs 2 to 1000 bins",
        ),
        (
            dict(statistic="quantile", value="studied_credits", low=0, high=360, bins=10, quantiles=[1.0]),
            "distinct probabilities in (0, 1)",
        ),
        (
            dict(statistic="quantile", value="score", low=0, high=100, bins=10, quantiles=[0.5]),
            "a statistic over submissions needs a bound m >= 1 on the rows one registration contributes",
        ),
        (dict(statistic="count", value="", group_by=["assessment_type"]), "an unbounded contribution is refused"),
        (dict(group_by=["assessment_id"]), "group_by: field 'assessment_id' is not a categorical field"),
        (dict(epsilon=5.0), "privacy.max_epsilon_per_run"),
        (dict(delta=1e-3), "privacy.delta"),
    ],
)
def test_the_campus_refuses_a_revealing_or_loose_query_before_reading_data(aaa_dir, task_identity, change, reason):
    query = StatisticQuery()
    query.CopyFrom(WITHDRAWAL_BY_IMD)
    for key, value in change.items():
        field = getattr(query, key)
        if isinstance(value, list):
            del field[:]
            field.extend(value)
        else:
            setattr(query, key, value)
    reply = release_guard(_request(query), campus_context(aaa_dir), query_handler)  # the default policy: ε ≤ 3, δ ≤ 1e-5
    assert reply.error.code == REFUSED and reason in reply.error.reason and "campus AAA refuses query" in reply.error.reason
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and record.message_type == "query" and reason in record.reason
    assert PrivacyLedger(aaa_dir.parent / "state").releases() == []  # nothing charged, nothing released


def test_a_campus_without_the_assessments_module_refuses_a_submission_statistic(aaa_dir, task_identity, tmp_path):
    core = (ROOT / "federation" / "mappings" / "oulad.toml").read_text()
    mapping = tmp_path / "core.toml"  # the OULAD mapping less module assessments
    mapping.write_text(core[: core.index("[assessments]")] + core[core.index("[learners]") : core.index("[submissions]")])
    query = load_query(SCORE_BY_TYPE)
    reply = release_guard(_request(query), campus_context(aaa_dir, mapping=str(mapping)), query_handler)
    assert reply.error.code == REFUSED
    assert (
        "this campus's data have no module assessments" in reply.error.reason and "campus AAA refuses query" in reply.error.reason
    )
    assert PrivacyLedger(aaa_dir.parent / "state").releases() == []  # refused before any ε is charged
    with pytest.raises(QueryError, match="no module assessments"):  # and the campus's own call fails alike
        records(query, {k: v for k, v in load_tables(aaa_dir, mapping).frames.items()})


def test_repeated_queries_spend_the_budget_until_refusal(aaa_dir, task_identity, tmp_path):
    policy = _policy(tmp_path, "[privacy]\nmax_epsilon_per_run = 1.0\ntotal_epsilon_budget = 3.0\n")
    z = CampusPolicy.load(policy).noise_multiplier(noise_multiplier(WITHDRAWAL_BY_IMD))
    affordable = max(n for n in range(1, 50) if epsilon([(z, 1.0, n)], 1e-5) <= 3.0)  # RDP composition of n releases
    assert 3 < affordable < 20
    context = campus_context(aaa_dir, policy=policy)
    replies = [release_guard(_request(WITHDRAWAL_BY_IMD, f"q{i}"), context, query_handler) for i in range(affordable + 1)]
    assert not any(r.has_error() for r in replies[:-1])
    assert replies[-1].error.code == REFUSED and "privacy.total_epsilon_budget" in replies[-1].error.reason
    state = aaa_dir.parent / "state"
    ledger = PrivacyLedger(state)
    assert [r.dp.mechanism for r in ledger.releases()] == ["gaussian"] * affordable
    assert 2.9 < ledger.spent(dataset_id(aaa_dir), 1e-5) <= 3.0
    records = AuditLog(state).records()
    assert [r.sent for r in records] == [True] * affordable + [False]
    assert {(r.dp.mechanism, r.dp.noise_multiplier, r.dp.sample_rate, r.dp.steps) for r in records[:-1]} == {
        ("gaussian", z, 1.0, 1)
    }
    first = StatisticAnswer.FromString(replies[0].content[ANSWER][ANSWER])
    assert first.campus == "AAA" and first.epsilon == pytest.approx(records[0].dp.epsilon) and first.epsilon <= 1.0


def test_a_statistic_and_training_spend_one_budget(aaa_dir, task_identity):
    cfg = RunConfig(model="logistic", num_rounds=1, target_epsilon=1.0)
    model = build_model(cfg.model, len(feature_names(OULAD)))
    content = RecordDict({ARRAYS: model_arrays(model), CONFIG: ConfigRecord({**cfg.to_flower(), "server-round": 1})})
    train = Message(content, dst_node_id=1, message_type="train")
    context = campus_context(aaa_dir)
    assert not release_guard(train, context, train_handler).has_error()
    assert not release_guard(_request(WITHDRAWAL_BY_IMD), context, query_handler).has_error()
    ledger = PrivacyLedger(aaa_dir.parent / "state")
    assert list(ledger.datasets()) == [dataset_id(aaa_dir)]  # one dataset identity for both kinds of release
    trained, queried = ledger.releases()
    assert (trained.dp.mechanism, queried.dp.mechanism) == ("dp-sgd", "gaussian")
    total = ledger.spent(dataset_id(aaa_dir), 1e-5)
    assert max(trained.dp.epsilon, queried.dp.epsilon) < total <= trained.dp.epsilon + queried.dp.epsilon


def _tamper_small(a: StatisticAnswer) -> None:
    a.cells[0].noisy_count = 3.0


def _tamper_sum(a: StatisticAnswer) -> None:
    a.cells.append(Cell(group=["nowhere"], noisy_count=50.0, noisy_sum=1.0))


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (_tamper_small, "below release.min_cohort_size 10"),
        (_tamper_sum, "is not a cell of query"),
        (lambda a: a.cells[0].ClearField("noisy_sum"), "a noisy sum belongs to a mean only"),
        (lambda a: setattr(a, "campus", "BBB"), "answer of campus 'BBB'"),
    ],
)
def test_the_guard_blocks_an_answer_the_query_does_not_declare(aaa_dir, task_identity, tamper, reason):
    def leaky_handler(msg: Message, context: Context) -> Message:
        reply = query_handler(msg, context)
        a = StatisticAnswer.FromString(reply.content[ANSWER][ANSWER])
        tamper(a)
        reply.content[ANSWER][ANSWER] = a.SerializeToString()
        return reply

    reply = release_guard(_request(WITHDRAWAL_BY_IMD), campus_context(aaa_dir), leaky_handler)
    assert reply.error.code == BLOCKED and "release guard blocked the query reply" in reply.error.reason
    assert not reply.has_content() and reason not in reply.error.reason  # the details stay on the campus
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and reason in record.reason


def test_the_guard_blocks_bytes_hidden_outside_the_answer_fields(aaa_dir, task_identity):
    def smuggler(msg: Message, context: Context) -> Message:
        reply = query_handler(msg, context)
        reply.content[ANSWER][ANSWER] += b"\xa2\x06\x0511391"  # field 100, a student id: unknown to StatisticAnswer
        return reply

    reply = release_guard(_request(WITHDRAWAL_BY_IMD), campus_context(aaa_dir), smuggler)
    assert reply.error.code == BLOCKED and "release guard blocked the query reply" in reply.error.reason
    assert not reply.has_content() and "not StatisticAnswer fields" not in reply.error.reason
    [record] = AuditLog(aaa_dir.parent / "state").records()
    assert not record.sent and "not StatisticAnswer fields" in record.reason


# --- the query file and the command ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, named",
    [
        ('statistic = "mean"\nvalue = "studied_credits"\nepsilon = 1\n', "a mean needs finite clipping bounds"),
        ('statistic = "count"\ngroup_by = ["student_id"]\nepsilon = 1\n', "group_by: field 'student_id'"),
        ('statistic = "count"\nepsilon = 1\ngroup = ["region"]\n', "group: Extra inputs are not permitted"),
        ('statistic = "count"\n', "epsilon: Field required"),
        ('statistic = "count"\nepsilon = "1"\n', "epsilon: Input should be a valid number"),  # strict: a string is no number
        (
            'statistic = "quantile"\nvalue = "studied_credits"\nlow = 0\nhigh = 360\n'
            "bins = 10.0\nquantiles = [0.5]\nepsilon = 1\n",
            "bins: Input should be a valid integer",
        ),  # nor a decimal a count
    ],
)
def test_a_bad_query_file_exits_2_naming_the_file_and_key(tmp_path, capsys, text, named):
    from edufl.experiments.cli import main

    path = tmp_path / "q.toml"
    path.write_text(text)
    with pytest.raises(QueryError, match=str(path)):
        load_query(path)
    assert main(["analytics", "run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"edufl: {path}: ") and named in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--insecure"], "--insecure: deployment options; give --superlink HOST:PORT too"),
        (["--superlink", "127.0.0.1:1", "--insecure", "--policy", "p.toml"], "--policy: simulation options"),
        (["--superlink", "127.0.0.1:1", "--insecure", "--campus", "a=d"], "--campus: simulation options"),
        (["--campus", "a=d", "--campus-by", "region"], "--campus gives the campuses: leave out --data and --campus-by"),
    ],
)
def test_simulation_and_deployment_options_are_not_mixed(tmp_path, capsys, args, named):
    from edufl.experiments.cli import main

    assert main(["analytics", "run", str(SCORE_BY_TYPE), "--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_shipped_queries_are_valid():
    queries = sorted((ROOT / "experiments" / "queries").glob("*.toml"))
    assert len(queries) >= 2
    for path in queries:
        load_query(path)


def test_withdrawal_rate_by_imd_band_is_within_its_stated_bound_on_seeded_noise(tables):
    # The run below, in process and with reproducible noise (deterministic): each module campus answers with the
    # multiplier and k the simulation uses, the coordinator combines, the bounds hold at full strength.
    query = load_query(WITHDRAWAL_FILE)
    z = noise_multiplier(query)
    answers = [
        answer(query, own, name, z, 10, schema=OULAD, randomness=Randomness(seed=100 + i))
        for i, (name, own) in enumerate(campus_slices(tables, "module").items())
    ]
    truth = {key[0]: s / n for key, (n, s) in exact_cells(query, tables, OULAD).items()}
    rows = combine(query, answers, OULAD)
    assert len(answers) == 7 and len(rows) == 11
    errors = [abs(r.estimate - truth[r.group]) for r in rows]
    assert sum(e <= r.bound95 for e, r in zip(errors, rows, strict=True)) >= 7, list(
        zip(errors, rows, strict=True)
    )  # 95 % bounds: most
    assert all(e <= 5 * r.std for e, r in zip(errors, rows, strict=True))
    assert all(r.bound95 == pytest.approx(Z_95 * r.std) for r in rows)


@pytest.mark.simulation
def test_withdrawal_rate_by_imd_band_is_within_its_stated_bound(tables, data_dir, tmp_path):
    out = tmp_path / "imd"
    env = {**os.environ, "EDUFL_DATA": str(data_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edufl.experiments.cli",
            "analytics",
            "run",
            str(ROOT / "experiments" / "queries" / "withdrawal_by_imd.toml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "7 campuses by module" in done.stdout and "ε ≤ 1 per campus" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refusals"] == [] and len(summary["campuses"]) == 7
    for campus in summary["campuses"]:
        assert 0.99 <= campus["epsilon"] <= 1.0 and campus["delta"] == 1e-5
        assert campus["count_std"] == pytest.approx(math.sqrt(2) * campus["noise_multiplier"])
    for name in ("statistics.csv", "statistics.md", "statistics.png"):
        assert (out / name).stat().st_size > 0
    assert "noise multiplier" in (out / "statistics.md").read_text()
    query = load_query(WITHDRAWAL_FILE)
    truth = {key[0]: s / n for key, (n, s) in exact_cells(query, tables, OULAD).items()}
    rows = summary["estimates"]
    assert len(rows) == 11
    errors = [abs(r["estimate"] - truth[(r["imd_band"],)]) for r in rows]
    # The campuses' noise is secret here, so these two checks are statistical, sized to fail with P < 1e-6 (the
    # same bounds at full strength, 7 of 11 and 5 std, are checked on seeded noise in
    # test_withdrawal_rate_by_imd_band_is_within_its_stated_bound_on_seeded_noise). Each band's error / std is
    # nearly N(b, 1), independently across bands, with |b| < 0.2 from campuses' suppressed or barely released
    # cells (GGG's 7 "missing" registrations: b < 0.11 each way; 3,000 seeded runs: |mean| <= 0.07, sd 0.98-1.02).
    # At |b| = 0.2 a band is outside bound95 with P = 0.055 and outside 6 std with P = 3.6e-9, so more than 6 of
    # 11 outside bound95 has P = 3.9e-7 (binomial) and any beyond 6 std P = 4.0e-8: together 4.3e-7.
    assert sum(e <= r["bound95"] for e, r in zip(errors, rows, strict=True)) >= 5, list(zip(errors, rows, strict=True))
    assert all(e <= 6 * r["std"] for e, r in zip(errors, rows, strict=True)), list(zip(errors, rows, strict=True))
    # What the coordinator received is what each campus logged as sent, with the release's DP parameters.
    logged = set()
    for campus in summary["campuses"]:
        [record] = AuditLog(out / "campuses" / campus["campus"]).records()
        assert record.sent and record.message_type == "query" and record.dp.mechanism == "gaussian"
        assert record.dp.epsilon == pytest.approx(campus["epsilon"])
        logged.add((campus["campus"], record.payload_sha256))
    assert logged == {(r["campus"], r["payload_sha256"]) for r in summary["receipts"]}
