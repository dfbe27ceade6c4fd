"""Products, line items and carts."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    price: Decimal
    category: str = "general"

    def __post_init__(self):
        if self.price < 0:
            raise ValueError(f"price of {self.sku} must not be negative")


@dataclass
class LineItem:
    product: Product
    quantity: int = 1

    @property
    def subtotal(self) -> Decimal:
        return self.product.price * self.quantity


@dataclass
class Cart:
    items: list[LineItem] = field(default_factory=list)
    coupon: str | None = None

    def add(self, product: Product, quantity: int = 1) -> None:
        for item in self.items:
            if item.product.sku == product.sku:
                item.quantity += quantity
                return
        self.items.append(LineItem(product, quantity))

    def remove(self, sku: str) -> None:
        self.items = [item for item in self.items if item.product.sku != sku]

    def __len__(self) -> int:
        return sum(item.quantity for item in self.items)
