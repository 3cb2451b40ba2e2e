"""Leases of workflow keys, kept in Redis."""

from .store import ClaimStatus, Lease, LeaseStore, WorkerInfo

__all__ = ["ClaimStatus", "Lease", "LeaseStore", "WorkerInfo"]
