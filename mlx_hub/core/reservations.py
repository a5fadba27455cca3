"""What a model's requests in flight hold under the memory budget, and what the next one would.

Admission asks ``Reservations.next`` what a request would reserve if it started
now (its KV cache and prefill, and in a batch the padding it adds to the
others), counts it in with ``add`` and gives it back with ``remove``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_hub.core.policy import batch_padding


@dataclass(frozen=True)
class Reservation:
    """What one request in flight holds under the budget: ``bytes`` in all, of which ``kv`` is its own KV
    cache and ``kv_reserved`` its KV with the batch padding it took on joining (``prefill`` likewise)."""

    bytes: int = 0
    kv: int = 0
    kv_reserved: int = 0
    prefill: int = 0
    prefill_reserved: int = 0


NO_RESERVATION = Reservation()


class Reservations:
    """The reservations of one model's requests in flight, one per request that reserved memory."""

    def __init__(self) -> None:
        self.held: list[Reservation] = []

    @property
    def bytes(self) -> int:
        """What the requests in flight reserve (KV cache, prefill, batch padding), summed."""
        return sum(r.bytes for r in self.held)

    def next(self, kv: int, prefill: int, batched: bool) -> Reservation:
        """A request's reservation if it started now: its KV and prefill, and in a batch the padding it adds."""
        held = self.held if batched else []
        kv_pad = batch_padding(kv, [r.kv for r in held], sum(r.kv_reserved for r in held)) if held else 0
        # Prompts admitted together are prefilled as one padded batch: as for KV, each counts at the longest.
        pre_pad = (
            batch_padding(prefill, [r.prefill for r in held], sum(r.prefill_reserved for r in held))
            if held
            else 0
        )
        return Reservation(
            bytes=kv + kv_pad + prefill + pre_pad,
            kv=kv,
            kv_reserved=kv + kv_pad,
            prefill=prefill,
            prefill_reserved=prefill + pre_pad,
        )

    def add(self, reservation: Reservation) -> None:
        if reservation.bytes:
            self.held.append(reservation)

    def remove(self, reservation: Reservation) -> None:
        if reservation.bytes and reservation in self.held:
            self.held.remove(reservation)
