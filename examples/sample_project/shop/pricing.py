"""Prices: coupons, category discounts and sales tax."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from shop.models import Cart, LineItem

TAX_RATE = Decimal("0.08")
COUPONS = {"WELCOME10": Decimal("0.10"), "SPRING25": Decimal("0.25")}
CATEGORY_DISCOUNTS = {"books": Decimal("0.05")}


def round_cents(amount: Decimal) -> Decimal:
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def apply_discount(amount: Decimal, rate: Decimal) -> Decimal:
    if not Decimal(0) <= rate <= Decimal(1):
        raise ValueError(f"discount rate must be between 0 and 1, got {rate}")
    return amount * (1 - rate)


def line_total(item: LineItem) -> Decimal:
    rate = CATEGORY_DISCOUNTS.get(item.product.category, Decimal(0))
    return apply_discount(item.subtotal, rate)


def cart_subtotal(cart: Cart) -> Decimal:
    return sum((line_total(item) for item in cart.items), Decimal(0))


def cart_total(cart: Cart) -> Decimal:
    subtotal = cart_subtotal(cart)
    if cart.coupon is not None:
        subtotal = apply_discount(subtotal, COUPONS.get(cart.coupon, Decimal(0)))
    tax = subtotal * TAX_RATE
    return round_cents(subtotal + tax)
