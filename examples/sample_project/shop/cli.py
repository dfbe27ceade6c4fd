"""Command line: price a cart given as SKU=QUANTITY pairs."""

from __future__ import annotations

import argparse
from decimal import Decimal

from shop.models import Cart, Product
from shop.pricing import cart_total

CATALOG = {
    "BK-001": Product("BK-001", "Refactoring", Decimal("47.99"), "books"),
    "MG-010": Product("MG-010", "Coffee mug", Decimal("12.50")),
    "KB-200": Product("KB-200", "Mechanical keyboard", Decimal("129.00"), "electronics"),
}


def parse_items(pairs: list[str]) -> Cart:
    cart = Cart()
    for pair in pairs:
        sku, _, quantity = pair.partition("=")
        if sku not in CATALOG:
            raise SystemExit(f"unknown SKU {sku!r}; known: {', '.join(CATALOG)}")
        cart.add(CATALOG[sku], int(quantity or 1))
    return cart


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="price a cart")
    parser.add_argument("items", nargs="+", help="SKU=QUANTITY")
    parser.add_argument("--coupon")
    args = parser.parse_args(argv)
    cart = parse_items(args.items)
    cart.coupon = args.coupon
    print(f"{len(cart)} items, total {cart_total(cart)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
