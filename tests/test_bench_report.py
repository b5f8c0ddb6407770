"""``steerlm-kernels bench``'s tables: the peers' table is loud about failures."""

from __future__ import annotations

from steerlm_kernels.bench import report


def test_peers_table_is_loud_about_failures() -> None:
    err = "\n".join(report.peers_table({"mode": "interpreter", "error": "exit 1: boom"}))
    assert "**ERROR** exit 1: boom" in err
    rows = [{"peer": "liger", "op": "token_nll", "n": 3, "v": 5, "h": None, "dtype": "float32",
             "value_rel_err": 0.5, "grad_rel_err": None, "value_rel_err_ours": 0.5, "grad_rel_err_ours": None,
             "tol": 1e-4, "agrees": False, "error": None}]
    table = "\n".join(report.peers_table({"mode": "interpreter", "rows": rows, "available": {"cce": "x"}}))
    assert "**NO**" in table and "`cce` not checked: x" in table and "interpreter" in table
