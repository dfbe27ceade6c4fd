"""Stock levels per product, with reservations for carts being checked out."""

from __future__ import annotations

from collections import defaultdict

from shop.models import Cart, Product


class OutOfStock(Exception):
    pass


class Inventory:
    def __init__(self):
        self.products: dict[str, Product] = {}
        self.stock: dict[str, int] = defaultdict(int)
        self.reserved: dict[str, int] = defaultdict(int)

    def receive(self, product: Product, quantity: int) -> None:
        self.products[product.sku] = product
        self.stock[product.sku] += quantity

    def available(self, sku: str) -> int:
        return self.stock[sku] - self.reserved[sku]

    def reserve(self, cart: Cart) -> None:
        for item in cart.items:
            if self.available(item.product.sku) < item.quantity:
                raise OutOfStock(f"only {self.available(item.product.sku)} of {item.product.name} left")
        for item in cart.items:
            self.reserved[item.product.sku] += item.quantity

    def release(self, cart: Cart) -> None:
        for item in cart.items:
            self.reserved[item.product.sku] -= item.quantity

    def low_stock(self, threshold: int = 5) -> list[Product]:
        return [self.products[sku] for sku in self.products if self.available(sku) < threshold]
