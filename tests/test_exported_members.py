"""The public surface of `proxy` is small and deliberate."""

import proxy


def test_all_is_sorted_and_complete() -> None:
    """Users import exactly the names the contract promises, and nothing disappears."""
    assert proxy.__all__ == sorted(proxy.__all__)
    for name in ("AuthProxy", "ProxyConfig", "UnauthorizedEvent", "ReauthorizedEvent",
                 "WorkloadStatus"):
        assert name in proxy.__all__
        assert getattr(proxy, name) is not None
