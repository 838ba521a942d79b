"""The records that cross an asset, op or process boundary, typed.

Each is a frozen pydantic model that refuses unknown fields. The record IO manager
(fct_assets.lib.io_managers) writes one as flat JSON, its fields plus two header keys naming the
record type and its schema version; loading checks both, so a record written by an older fct
(a renamed or dropped field, another schema version) or of an unknown type fails with one line
naming the file, instead of a KeyError in another process later.

A loaded checkpoint is a `Checkpoint`: the model with the sha256 it was verified against, its
embedding space and the metadata of the materialisation that wrote it (a `CheckpointMeta`).

An eval report's metrics are fct_ml.evaluation's `CaseMetrics`, `GapClosed`, `BackfillCurve` and
`CurveArea` (frozen dataclasses, validated and written by pydantic as {"top1", "top5", "mAP"},
{"top1", "mAP"}, {"fractions", "top1", "mAP"} and {"top1", "mAP"}), and its upgrade decision
(`UpgradeDecision`: served against proposed per query) holds fct_ml.flips' `Flips`.

    DatasetRecord      dataset                 what the base assets were built from
    GalleryStore       gallery_store           the stored gallery table (old space + side-info)
    ShardRange         plan_backfill -> shard  one contiguous row range of the gallery
    BackfillPlan       plan_backfill           pass 1's choice and the shards
    ShardResult        backfill_shard          one shard's staged (or final) table
    BackfilledTable    backfilled_gallery      the version's published table
    VersionTable       promote, search         a version's table at one LanceDB version
    Hit                search                  one nearest gallery item (`fct search`)
    Deployment         the deployments table   one promote/rollback/ingest row
    CheckResult        promote                 the latest run of one blocking check of a version
    EvalReport         eval_report             the version's metrics
    UpgradeDecision    eval_report             served S against proposed P per query, gates
    IngestBatch        ingested_batch          one batch of items that arrived (inbox, `fct ingest`)
    StepCost           every asset, backfill op  wall time, CPU time, peak RSS (fct_assets.lib.cost)
    CheckpointMeta     a checkpoint's materialisation  its sha256, space and what it was made from
    QueryModel         the serving contract    the checkpoint that embeds queries, its sha256
    ServingContract    beside deployments      what a serving process needs (serving/contract.py)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from fct_ml.evaluation import BackfillCurve, Case, CaseMetrics, CurveArea, GapClosed
from fct_ml.flips import Flips, Interval

if TYPE_CHECKING:  # torch takes seconds to import; a code location should load fast
    import torch.nn as nn

# Header keys of a record file. A field of a record never starts with "fct_record".
TYPE_KEY = "fct_record"
SCHEMA_KEY = "fct_record_schema"


class RecordError(ValueError):
    """A record that cannot be read as the type it claims (one line naming the file)."""


class Record(BaseModel):
    """Base of every record: frozen, no unknown field. `SCHEMA` is bumped when fields change."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    SCHEMA: ClassVar[int] = 1


R = TypeVar("R", bound=Record)


class DatasetRecord(Record):
    """The dataset the base assets were built from, with its class split."""

    spec: str  # as given: "digits", "imagefolder:/data/x", ...
    name: str
    fingerprint: str  # content digest of images and labels
    old_classes: tuple[int, ...]  # what the old and side-info models may see
    class_names: tuple[str, ...]
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    train_items: int
    gallery_items: int


class TableRecord(Record):
    """A LanceDB table at the version one commit made."""

    table: str
    version: int
    rows: int


class GalleryStore(TableRecord):
    """The stored gallery: every item's image, old embedding and side-info."""

    old_space_id: str
    old_dim: int
    side_info_space_id: str
    side_info_dim: int
    old_model_sha256: str
    side_info_model_sha256: str
    dataset_fingerprint: str


class SourceTable(Record):
    """The table a version's backfill reads the stored vectors from, pinned: `gallery_store`
    (column old_embedding, space of the old model) before any promotion, else the deployed
    version's table (column embedding, that version's space). Side-info always comes from
    gallery_store."""

    table: str
    version: int
    column: str  # old_embedding | embedding
    space_id: str
    model_version: str | None = None  # the deployed model version; None: the old model
    rows: int = 0


class ShardRange(Record):
    """Rows [start, stop) of the pinned gallery_store: shard `index` of `count`."""

    index: int
    count: int
    start: int
    stop: int


class StepCost(Record):
    """What one step cost (fct_assets.lib.cost.measure): wall and CPU seconds, peak RSS in MB, and
    whether that peak is the step's own ("step") or its process's since it started."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_rss_scope: str = "step"


class BackfillPlan(Record):
    """Pass 1 of a version's backfill: the items to re-embed and the shards (plain JSON, so it
    travels between processes without pickling)."""

    SCHEMA: ClassVar[int] = 2  # 2: batch_size renamed rows_per_batch

    version: str
    gallery_store_version: int
    rows: int
    run_id: str
    reembed_fraction: float
    reembed_ids: tuple[int, ...]  # most uncertain first
    rows_per_batch: int  # rows read, transformed and written per LanceDB page
    ann_min_rows: int | None
    shards: tuple[ShardRange, ...]
    plan_seconds: float
    started_at: float | None = None  # wall clock when the plan began (epoch seconds)
    # Where the stored vectors come from (chained upgrades): gallery_store's old_embedding, or
    # the deployed version's table, pinned at the LanceDB version read.
    source: SourceTable | None = None
    cost: StepCost | None = None  # of the plan op (fct_assets.lib.cost)


class ShardResult(TableRecord):
    """One shard's rows, committed to its staging table (or, unsharded, the version's table)."""

    index: int
    reembedded: int
    staged: bool
    space_id: str
    dim: int
    seconds: float  # first read to commit
    pid: int | None = None
    transformation_sha256: str | None = None
    new_model_sha256: str | None = None
    cost: StepCost | None = None  # of the shard op, its process's model loading excluded


class BackfilledTable(TableRecord):
    """The version's published gallery table (`gallery_<version>`) and what its backfill cost."""

    space_id: str
    dim: int
    reembedded: int
    reembed_fraction: float
    shards: int
    backfill_seconds: float  # one worker's time for both passes and the staging copy
    backfill_items_per_s: float | None
    gallery_store_version: int
    gallery_rows: int
    ann_index: str  # "built" | "none"
    ann_params: dict[str, Any] | None = None
    transformation_sha256: str | None = None
    new_model_sha256: str | None = None
    backfill_wall_seconds: float | None = None
    source: SourceTable | None = None  # None: gallery_store (written before chained upgrades)


class VersionTable(Record):
    """A model version's table at one LanceDB version, in one embedding space."""

    version: str
    table: str
    table_version: int
    space_id: str


class Hit(Record):
    """One gallery item a search found: its row of the version's table and its L2 distance
    (squared, as LanceDB reports it) to the query."""

    item_id: int
    label: int  # -1: ingested without a label
    distance: float
    source: str  # "transformed", "re-embedded" or "ingested"


class CheckResult(Record):
    """The latest run of one blocking check on a version's asset partition, as promotion reads
    it: whether it passed, why not ("never ran", "failed", "stale: ran before the latest
    materialisation", "status X"), whether it ran after that partition's latest materialisation,
    the LanceDB table version it checked (None if its metadata names none) and its run."""

    passed: bool
    why: str
    ran_after_latest_materialization: bool = False
    table_version: int | None = None
    run_id: str | None = None  # None: the check never ran


class Deployment(VersionTable):
    """One row of the append-only deployments table. `note`: what the row's action decided
    beyond the table (a rollback: "complete", "caught up: ..." or "forced: ..."; an override:
    "accepted regressions: ..."); None in rows written before the column existed."""

    seq: int
    action: str  # promote | rollback | ingest
    at: str  # ISO 8601, UTC
    note: str | None = None
    # Who or what wrote the row (a run and what launched it, or a user, host and command); None
    # in rows written before the column existed.
    by: str | None = None


class Gates(Record):
    """The thresholds promotion is gated on (EvalReportConfig sets them; the defaults and their
    reasons are there)."""

    # Percent of queries: NFR of P(0) against S at most this; None: the chance level
    # (1 - err_S) x err_P, relative NFR 1 (fct_assets.upgrade.gates.nfr_threshold).
    max_nfr: float | None
    map_tolerance: float  # points: mAP of P(0) at least S's minus this


class GateVerdict(Record):
    """One gate's verdict on a version, and why in one line."""

    gate: str  # "nfr" | "map"
    passed: bool
    line: str


class MapResult(Record):
    """One h (the learned one or a closed-form map) at f = 0, against S: metrics in percent,
    NFR in percent, relative NFR (None where undefined), and its training time (None: not
    recorded)."""

    kind: str  # mlp | linear | procrustes
    top1: float
    top5: float
    mAP: float  # noqa: N815 (as CaseMetrics.mAP)
    nfr: float
    relative_nfr: float | None
    train_seconds: float | None


class WorstFlip(Record):
    """A negative flip: the query item, S's top-1 (right) and P(0)'s top-1 (wrong), by item id
    and class name, and the query's change in AP (P minus S, in [-1, 0])."""

    item_id: int
    label: str
    served_item_id: int
    served_label: str
    proposed_item_id: int
    proposed_label: str
    ap_change: float


class OrderGain(Record):
    """The sigma order minus the random order at one re-embed fraction (`planned`: the version's
    reembed_fraction; else the point the report chose), and over the whole curve (areas): top-1
    and mAP in points, NFR in points (negative: sigma flips fewer queries)."""

    fraction: float
    planned: bool
    top1: float
    mAP: float  # noqa: N815 (as CaseMetrics.mAP)
    nfr: float
    area_top1: float
    area_mAP: float  # noqa: N815 (as CaseMetrics.mAP)


class UpgradeDecision(Record):
    """What changes for each query if the version is promoted: S, what users get now, against
    P(f), the version's query model against its table with a fraction f re-embedded (sigma
    order); P(0) is the transformed table. Flips of P(0) against S over every query and per
    class with bootstrap intervals, NFR along the backfilling curves, the closed-form maps beside
    the learned h, the worst negative flips and the gates' verdicts."""

    served: str  # S in words
    served_version: str | None  # the model version S is; None: the old model
    proposed: str  # P in words
    served_metrics: CaseMetrics
    proposed_metrics: CaseMetrics  # P(0)
    new_metrics: CaseMetrics  # P(1): the full re-embedding
    flips: Flips  # P(0) against S
    nfr_curves: dict[str, tuple[float, ...]]  # order -> NFR (%) at backfill_curves' fractions
    order_gain: OrderGain
    maps: tuple[MapResult, ...]  # the learned h first, then the closed-form maps
    class_names: tuple[str, ...]
    gates: Gates
    verdicts: tuple[GateVerdict, ...]
    worst_flips: tuple[WorstFlip, ...]  # their picture: EvalReport.flips_png_base64

    @property
    def passed(self) -> bool:
        """Whether every gate passed."""
        return all(v.passed for v in self.verdicts)


class EvalReport(Record):
    """A version's metrics in percent: cases (query/gallery), the unseen-class split, backfilling
    curves and their areas, the costs measured on the way, and the upgrade decision."""

    # 2: decision, flips_png_base64; 3: queries, query_seed, sub_gallery, sub_gallery_cases,
    # cases_ci95
    SCHEMA: ClassVar[int] = 3

    version: str
    items: int
    cases: dict[str, CaseMetrics]  # by fct_ml.evaluation.Case (and new/gallery_<version>)
    cases_unseen_classes: dict[str, CaseMetrics | None]
    cases_seen_classes: dict[str, CaseMetrics | None]
    gap_closed: GapClosed  # by new/h(old)
    backfill_curves: dict[str, BackfillCurve]  # by order (fct_ml.backfill.ORDERS)
    backfill_auc: dict[str, CurveArea]
    reembedded: int
    table: str
    table_version: int
    reembed_seconds: float
    reembed_items_per_s: float
    backfill_items_per_s: float | None
    space_id: str
    plot_png_base64: str = ""  # left out of the event-log copy (metadata "json")
    seconds: float | None = None
    # What "old" stands for in the cases: the stored space h maps from. The old model's before
    # any promotion; in a chained upgrade the deployed version's table (e.g. "gallery_v2 at
    # LanceDB version 3, space new_model:v2@..."). Empty in reports written before it existed.
    old_space: str = ""
    decision: UpgradeDecision | None = None
    flips_png_base64: str = ""  # the worst negative flips; left out of the event-log copy
    # How many items queried: `items` (every item, leave-one-out) up to eval_report's
    # query_sample; above it a sample of that many, drawn with `query_seed`, queried all `items`
    # (S, P(0) and the cases in `cases_ci95`, with their bootstrap intervals over the queries).
    queries: int | None = None  # None: a report written before sampling existed (= items)
    query_seed: int | None = None
    # A sampled report's sub-gallery: the sampled items, leave-one-out among them, where what
    # needs every item re-embedded ran (new/new, new/old, P(1), the backfilling curves, the
    # closed-form maps, the gap closed); every case there, and S ("S"). None: no sample.
    sub_gallery: int | None = None
    sub_gallery_cases: dict[str, CaseMetrics] = {}
    cases_ci95: dict[str, dict[str, Interval]] = {}  # case -> {"top1", "mAP"}: 95 % bootstrap


# The eval report's headline numbers, as metadata of its materialisation (the UI plots them;
# `fct lineage` shows them): label -> value. "gap closed mAP (%)" only where there is a gap
# (new/new above old/old), NFR and relative NFR only in a report with a decision.
HEADLINE = (
    f"{Case.NEW_H_OLD} top1",
    f"{Case.NEW_H_OLD} mAP",
    f"{Case.OLD_OLD} mAP",
    f"{Case.NEW_NEW} mAP",
    "gap closed mAP (%)",
    "NFR at f=0 (%)",
    "relative NFR at f=0",
)


def headline(report: EvalReport) -> dict[str, float]:
    """The report's headline numbers by their labels (HEADLINE, in that order), rounded to two
    decimals; those that mean nothing for this report are left out."""
    cases = report.cases
    # The gap closed is measured where new/new was: the sub-gallery of a sampled report.
    alike = report.sub_gallery_cases or cases
    values: list[float | None] = [
        cases[Case.NEW_H_OLD].top1,
        cases[Case.NEW_H_OLD].mAP,
        cases[Case.OLD_OLD].mAP,
        cases[Case.NEW_NEW].mAP,
        report.gap_closed.mAP if alike[Case.NEW_NEW].mAP > alike[Case.OLD_OLD].mAP else None,
        report.decision.flips.all.nfr if report.decision else None,
        report.decision.flips.all.relative_nfr if report.decision else None,
    ]
    return {k: round(v, 2) for k, v in zip(HEADLINE, values, strict=True) if v is not None}


class Quarantined(Record):
    """A file of an ingest batch that did not land, and why (one line)."""

    file: str
    reason: str


class IngestBatch(Record):
    """One batch of arriving items: what landed where, in which space, and what was refused.

    Each table got at most one LanceDB commit; an item already present (same content) is not
    written again, so a re-dropped file or a retried run adds nothing."""

    SCHEMA: ClassVar[int] = 2  # 2: retrying added

    batch: str
    files: int
    ingested: tuple[int, ...]  # item_ids of the batch that decoded (new or already stored)
    added_to_store: int
    added_to_table: int
    duplicates: int  # items already in the store before this batch, or twice in it
    quarantined: tuple[Quarantined, ...]
    # Files that may still be being written, left in the inbox for a retry on a later tick.
    retrying: tuple[Quarantined, ...] = ()
    deployed_version: str | None  # None: the old model is deployed (no promotion yet)
    table: str  # the deployed table the items were appended to (gallery_store if none)
    space_id: str  # space of the embedding stored for them
    side_info_space_id: str
    store_version: int
    table_version: int
    deployment_seq: int | None = None  # the deployments row that serves the new table version
    seconds: float = 0.0
    items_per_s: float | None = None


class CheckpointMeta(Record):
    """What the materialisation of a checkpoint recorded (its metadata), as read back: where the
    file is, its sha256 and space, and for a transformation the spaces h was trained on. A field
    the materialisation did not record is empty ("")."""

    path: str = ""
    sha256: str = ""
    space_id: str = ""
    content_digest: str = ""
    code_version: str = ""
    run_id: str = ""
    # A transformation's: the spaces and checkpoints h was trained on.
    old_space_id: str = ""
    side_info_space_id: str = ""
    new_space_id: str = ""
    old_model_sha256: str = ""
    side_info_model_sha256: str = ""
    new_model_sha256: str = ""
    # The model version h maps from ("": the old model) and its space and checkpoint.
    source_version: str = ""
    source_space_id: str = ""
    source_model_sha256: str = ""
    # A transformation's kind (mlp | linear | procrustes; "": recorded before kinds existed),
    # and the seconds its training (or closed-form fit) took, features excluded.
    kind: str = ""
    train_seconds: float | None = None
    seed: int | None = None  # the run's seed (its features' augmentation among others)


class QueryModel(Record):
    """The model that embeds a deployment's queries: its checkpoint file, the sha256 that file
    must hash to (as its materialisation recorded it), and the space its vectors are in."""

    path: str
    sha256: str
    space_id: str


class ServingContract(Record):
    """What a process that answers queries needs, written beside the deployments table at each
    row (fct_assets/serving/contract.py): the row, its pinned table, how to search it, the query
    model, and how query images are prepared."""

    seq: int  # the deployments row this contract describes
    action: str  # promote | rollback | ingest
    version: str
    table: str
    table_uri: str
    table_version: int
    space_id: str
    metric: str  # LanceDB's distance type: "l2"
    # The IVF_PQ index's search parameters at this table version; None: no index, exact search.
    nprobes: int | None = None
    refine_factor: int | None = None
    # The gallery's images (its first stored one): query images are converted to its channels
    # (1 grey, 3 RGB) and resized to its size. None: no gallery_store when it was written.
    image_channels: int | None = None
    image_height: int | None = None
    image_width: int | None = None
    # None: no query model is known for this space (a row written without `fct promote`, e.g.
    # by deployment.append): a searcher refuses the contract.
    model: QueryModel | None = None
    # Every query model a contract has named, so that a rollback or an ingest row finds its own.
    models: tuple[QueryModel, ...] = ()


RECORDS: dict[str, type[Record]] = {
    cls.__name__: cls
    for cls in (
        DatasetRecord,
        GalleryStore,
        ShardRange,
        SourceTable,
        BackfillPlan,
        ShardResult,
        BackfilledTable,
        VersionTable,
        Hit,
        Deployment,
        CheckResult,
        Gates,
        GateVerdict,
        MapResult,
        WorstFlip,
        OrderGain,
        UpgradeDecision,
        EvalReport,
        Quarantined,
        IngestBatch,
        CheckpointMeta,
        QueryModel,
        ServingContract,
    )
}


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(record)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def dumps(record: Record) -> str:
    """The record as flat JSON: its fields and the two header keys."""
    if not isinstance(record, Record):
        raise RecordError(f"expected an fct record, got a {type(record).__name__}")
    kind = type(record)
    fields = record.model_dump(mode="json")
    return json.dumps({TYPE_KEY: kind.__name__, SCHEMA_KEY: kind.SCHEMA, **fields}, indent=2)


def loads(text: str, where: str, expected: type[R] | None = None) -> R:
    """The record in `text` (read from `where`, named in errors), of type `expected` if given."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise RecordError(f"{where}: not JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict) or TYPE_KEY not in data:
        raise RecordError(f"{where}: not an fct record (no {TYPE_KEY!r} key); re-materialise it")
    name, schema = data.pop(TYPE_KEY), data.pop(SCHEMA_KEY, None)
    cls = RECORDS.get(name)
    if cls is None:
        raise RecordError(f"{where}: unknown record type {name!r} (known: {', '.join(RECORDS)})")
    if expected is not None and not issubclass(cls, expected):
        raise RecordError(f"{where}: holds a {name}, expected a {expected.__name__}")
    if schema != cls.SCHEMA:
        raise RecordError(
            f"{where}: stale {name} record (schema {schema}, this fct reads {cls.SCHEMA});"
            " re-materialise it"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise RecordError(f"{where}: stale or invalid {name} record ({_one_line(err)})") from None


def from_metadata(cls: type[R], metadata: Mapping[str, Any], where: str) -> R:
    """The record `cls` from materialisation metadata (plain values), which may hold more keys."""
    try:
        return cls.model_validate({k: metadata[k] for k in cls.model_fields if k in metadata})
    except ValidationError as err:
        raise RecordError(f"{where}: metadata is not a {cls.__name__} ({_one_line(err)})") from None


@dataclass(frozen=True)
class Checkpoint:
    """A model loaded by the checkpoint IO manager, verified against its recorded sha256."""

    model: nn.Module  # in eval mode, on the CPU
    sha256: str
    space_id: str  # name@sha256[:12]: the space of the vectors it makes
    # The whole metadata of the materialisation this checkpoint came from: an asset that checks
    # it (e.g. the spaces h was trained on) reads the same record, not a later one.
    recorded: CheckpointMeta = CheckpointMeta()
