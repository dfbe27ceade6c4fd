"""shop: products, carts, inventory and pricing for a small online store."""

from shop.models import Cart, LineItem, Product
from shop.pricing import cart_total, apply_discount

__all__ = ["Cart", "LineItem", "Product", "cart_total", "apply_discount"]
