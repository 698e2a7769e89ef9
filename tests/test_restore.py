"""Start-up restore: the saved state merged with the store's folders, each checked as files."""

import shutil

from server.restore import restore
from server.roots import Roots
from server.state import Record, State, StateFile


def test_restore_merges_state_and_store_and_reports_what_fails(store_copy):
    store = store_copy
    shutil.copytree(store / "alpha", store / "newcomer")          # appeared after the last run
    shutil.copytree(store / "alpha", store / "dropped")           # unregistered on purpose
    shutil.copytree(store / "alpha", store / "changed")
    sf = StateFile(store)
    sf.write(State([Record("alpha", "adapter", "alpha", pinned=True, created=7),
                    Record("gone", "adapter", "gone"),                              # folder deleted
                    Record("changed", "adapter", "changed", sha256="0" * 64)],      # files changed
                   removed=["dropped"]))
    (sf.home / ".staging-x-1").mkdir()
    out = restore(sf, Roots(store, []), base_id="base-x")
    got = {e.name: e for e in out.entries}
    assert set(got) == {"alpha", "beta", "newcomer"}
    assert got["alpha"].pinned and got["alpha"].created == 7 and not got["newcomer"].pinned
    assert set(out.failed) == {"gone", "changed"} and "changed since" in out.failed["changed"][1]
    assert out.removed == {"dropped"} and not (sf.home / ".staging-x-1").exists()
    assert {e.name for e in restore(sf, Roots(store, []), base_id="base-x", scan_store=False).entries} == {"alpha"}
