from decimal import Decimal

from shop.models import Cart, Product
from shop.pricing import apply_discount, cart_total

BOOK = Product("BK-001", "Refactoring", Decimal("47.99"), "books")
MUG = Product("MG-010", "Coffee mug", Decimal("12.50"))


def test_discount():
    assert apply_discount(Decimal("100"), Decimal("0.25")) == Decimal("75.00")


def test_cart_total_with_coupon():
    cart = Cart(coupon="WELCOME10")
    cart.add(BOOK)
    cart.add(MUG, 2)
    assert cart_total(cart) == Decimal("68.61")
