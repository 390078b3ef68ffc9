"""Maintenance of the results folder and the spool: pruning per-slice outputs, retention.

Per-slice outputs are only needed until every delivery of the series is done or dead (a
series that later gains instances infers its slices again); :func:`maintain` also applies the
spool's retention (:func:`edge.jobs.ledger.cleanup`) and prunes what a crash left behind.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable

from edge.core.config import SpoolSettings
from edge.ingest.spool import Spool
from edge.jobs import queries
from edge.jobs.ledger import Ledger, SeriesState, cleanup
from edge.pipeline.slices import SliceStore

LOG = logging.getLogger(__name__)


def prune_slice_folder(store: SliceStore, series_instance_uid: str) -> bool:
    """Remove the series' per-slice outputs; True if removed."""
    folder = store.root / series_instance_uid / "slices"
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        return False
    except OSError as exc:
        LOG.warning("series %s: cannot prune slice outputs: %s", series_instance_uid, exc)
        return False
    return True


def maintain(spool: Spool | None, ledger: Ledger, store: SliceStore, cfg: SpoolSettings,
             has_open_deliveries: Callable[[str], bool],
             prune: Callable[[str], bool]) -> None:
    """One pass: the spool's retention (``spool.retention_*``), then prune slice outputs of
    finished series whose deliveries are all done or dead (left by a crash before the last
    outcome). ``has_open_deliveries``: this process still waits for one of the series;
    ``prune``: removes a series' outputs unless it is being worked on.

    Raises: OutOfResourcesError, LedgerError.
    """
    if spool is not None:
        report = cleanup(spool, ledger, cfg.retention_max_age_s, cfg.retention_min_free_bytes)
        if report.removed:
            LOG.info("retention: removed %d instances (%d bytes)", report.removed,
                     report.freed_bytes)
    for folder in store.root.glob("*/slices"):
        uid = folder.parent.name
        if has_open_deliveries(uid):
            continue
        try:
            record = queries.series(ledger, uid)
        except queries.SeriesNotFoundError:
            continue
        if record.state in (SeriesState.DONE, SeriesState.FAILED) and \
                not queries.open_deliveries(ledger, uid):
            prune(uid)
