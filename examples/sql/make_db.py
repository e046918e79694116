"""Build examples/sql/shop.sqlite: a small web shop (customers, products, orders, order items), seeded so the file
is the same on every run.

    python examples/sql/make_db.py          # writes shop.sqlite next to this script

The schema is also in SCHEMA below, which make_data.py puts in every prompt.
"""

from __future__ import annotations

import os
import random
import sqlite3
import tempfile
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
DB_FILE = HERE / "shop.sqlite"

SCHEMA = """\
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, country TEXT NOT NULL,
                        joined_on TEXT NOT NULL);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, category TEXT NOT NULL,
                       price REAL NOT NULL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                     ordered_on TEXT NOT NULL, status TEXT NOT NULL);
CREATE TABLE order_items (order_id INTEGER NOT NULL REFERENCES orders(id),
                          product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL);
"""

CITIES = {"Germany": ["Berlin", "Hamburg", "Munich"], "France": ["Paris", "Lyon", "Marseille"],
          "Spain": ["Madrid", "Barcelona", "Valencia"], "Italy": ["Rome", "Milan", "Turin"],
          "Netherlands": ["Amsterdam", "Rotterdam", "Utrecht"]}
FIRST = ["Anna", "Ben", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karla", "Luca",
         "Marta", "Nico", "Olga", "Paul", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wim", "Yara", "Zoe"]
LAST = ["Weber", "Martin", "Garcia", "Rossi", "de Vries", "Schulz", "Bernard", "Lopez", "Bianchi", "Jansen",
        "Fischer", "Moreau", "Romano", "Bakker", "Navarro", "Klein"]
PRODUCTS = {
    "books": [("The Silent Harbor", 14.5), ("Maps of Tomorrow", 22.0), ("A Short History of Salt", 18.0),
              ("Learning SQL", 39.9), ("Garden Year", 12.5)],
    "electronics": [("USB-C Cable", 9.9), ("Wireless Mouse", 24.5), ("Noise Cancelling Headphones", 189.0),
                    ("Desk Lamp", 34.0), ("Portable Charger", 45.0), ("Mechanical Keyboard", 99.0)],
    "kitchen": [("Chef Knife", 59.0), ("Cast Iron Pan", 42.0), ("Coffee Grinder", 79.0), ("Tea Kettle", 29.5),
                ("Cutting Board", 19.0)],
    "toys": [("Wooden Train", 35.0), ("Puzzle 1000 Pieces", 16.0), ("Kite", 21.0), ("Building Blocks", 27.5)],
    "garden": [("Watering Can", 15.0), ("Pruning Shears", 23.0), ("Seed Starter Kit", 11.5),
               ("Garden Hose", 38.0), ("Bird Feeder", 17.5)],
}
STATUSES = ["delivered", "delivered", "delivered", "shipped", "pending", "cancelled", "returned"]


def build(path: Path = DB_FILE, seed: int = 7) -> Path:
    """Write the database whole (temp file + rename), deterministically from `seed`."""
    rng = random.Random(seed)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".shop.", suffix=".sqlite")
    os.close(fd)
    os.chmod(staging, 0o644)  # mkstemp makes it private; the shipped example is for everyone
    try:
        db = sqlite3.connect(staging)
        db.executescript(SCHEMA)
        names = rng.sample([f"{f} {last}" for f in FIRST for last in LAST], 48)
        customers = []
        for number, name in enumerate(names, start=1):
            country = rng.choice(sorted(CITIES))
            joined = date(2021, 1, 1) + timedelta(days=rng.randrange(0, 3 * 365))
            customers.append((number, name, rng.choice(CITIES[country]), country, joined.isoformat()))
        db.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", customers)
        products = [(number, name, category, price) for number, (category, name, price) in enumerate(
            ((c, n, p) for c, items in PRODUCTS.items() for n, p in items), start=1)]
        db.executemany("INSERT INTO products VALUES (?, ?, ?, ?)", products)
        orders, items = [], []
        for number in range(1, 201):
            customer = rng.choice(customers)
            start = date.fromisoformat(customer[4])
            ordered = start + timedelta(days=rng.randrange(0, (date(2024, 12, 31) - start).days + 1))
            orders.append((number, customer[0], ordered.isoformat(), rng.choice(STATUSES)))
            for product in rng.sample(products, rng.randint(1, 4)):
                items.append((number, product[0], rng.choice([1, 1, 1, 2, 2, 3, 5])))
        db.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
        db.executemany("INSERT INTO order_items VALUES (?, ?, ?)", items)
        db.commit()
        db.close()
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path


if __name__ == "__main__":
    print(f"wrote {build()}")
