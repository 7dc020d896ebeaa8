"""Money: per-model prices (versioned), exact per-request cost, and budgets per tenant and key.

Units. Prices are integer *micro-units of the currency per million tokens* (USD 0.15 per
million input tokens is ``150_000``). A request's cost is then an exact integer in
*pico-units* (1e-12 of the currency): ``tokens * price``, no division, no floats, so a cost
column always equals tokens x price and sums of costs equal the cost of sums. Budgets are set
in micro-units (the unit an operator types) and compared in pico-units.
"""

PICO_PER_MICRO = 1_000_000


def micros_from_pico(pico: int) -> int:
    """Whole micro-units in a pico-unit amount, rounded down (for display and limits)."""
    return pico // PICO_PER_MICRO
