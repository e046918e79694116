"""Write examples/sql/train.jsonl, test.jsonl and rl.jsonl: questions about shop.sqlite with the SQLite query that
answers each, generated from templates. rl.jsonl (for GRPO) asks training's value combinations in phrasings that
neither other split uses.

    python examples/sql/make_data.py

Every template has phrasings used only for training and phrasings used only for testing, and the test split's
value combinations (a city, a category and a price, ...) never occur in training: the test measures whether a
model learnt to write queries, not whether it remembers these. Each line is a chat conversation (system prompt
with the schema, the question, the query), so the same file trains SFT and GRPO and is scored by `ownllm eval sql`.
Every gold query is run against the database here; one that fails stops the script.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DB_FILE = HERE / "shop.sqlite"
SYSTEM = ("You write SQLite queries. Tables: customers(id, name, city, country, joined_on), "
          "products(id, name, category, price), orders(id, customer_id, ordered_on, status), "
          "order_items(order_id, product_id, quantity). Dates are 'YYYY-MM-DD' text. "
          "Reply with one SQL query only.")


@dataclass(frozen=True)
class Template:
    train: list[str]  # phrasings for the training split
    test: list[str]  # phrasings seen only in the test split
    rl: list[str]  # phrasings for the reinforcement split (rl.jsonl): neither in training nor in test
    sql: str
    values: Callable[[random.Random], dict[str, object]]


def templates(db: sqlite3.Connection) -> list[Template]:
    def column(sql: str) -> list:
        return [row[0] for row in db.execute(sql)]

    cities, countries = column("SELECT DISTINCT city FROM customers"), column("SELECT DISTINCT country FROM customers")
    categories = column("SELECT DISTINCT category FROM products")
    statuses = column("SELECT DISTINCT status FROM orders")
    products, customers = column("SELECT name FROM products"), column("SELECT name FROM customers")
    prices = [10, 15, 20, 25, 30, 40, 50, 60, 80, 100]
    years = ["2021", "2022", "2023", "2024"]

    def pick(**pools: list) -> Callable[[random.Random], dict[str, object]]:
        return lambda rng: {name: rng.choice(pool) for name, pool in pools.items()}

    def price_range(rng: random.Random) -> dict[str, object]:
        low, high = sorted(rng.sample(prices, 2))
        return {"low": low, "high": high}

    return [
        Template(["How many customers live in {city}?", "Count the customers from {city}.",
                  "Number of customers in {city}?"],
                 ["What is the customer count for the city of {city}?"],
                 ["Tell me how many of our customers are located in {city}.",
                  "{city}: how many customers do we have there?"],
                 "SELECT COUNT(*) FROM customers WHERE city = '{city}'", pick(city=cities)),
        Template(["List the names of customers in {country}.", "Which customers are from {country}?",
                  "Show customer names for {country}."],
                 ["Give me everyone registered in {country} (names only)."],
                 ["Who are our customers in {country}?", "I need the names of all {country} customers."],
                 "SELECT name FROM customers WHERE country = '{country}'", pick(country=countries)),
        Template(["Which {category} products cost less than {price}?", "List {category} products under {price}.",
                  "Names of products in {category} with a price below {price}."],
                 ["I want {category} items that are cheaper than {price}: which ones?"],
                 ["Find the {category} products whose price is lower than {price}.",
                  "Show {category} products priced below {price}."],
                 "SELECT name FROM products WHERE category = '{category}' AND price < {price}",
                 pick(category=categories, price=prices)),
        Template(["What is the most expensive product in {category}?", "Most expensive {category} product?",
                  "Which {category} product has the highest price?"],
                 ["Name the priciest item in the {category} category."],
                 ["Which product in {category} costs the most?", "Top-priced product in the {category} category?"],
                 "SELECT name FROM products WHERE category = '{category}' ORDER BY price DESC LIMIT 1",
                 pick(category=categories)),
        Template(["What is the average price of {category} products?", "Average price in category {category}?",
                  "Compute the mean price of products in {category}."],
                 ["On average, how much does a {category} product cost?"],
                 ["Give the mean {category} product price.", "Tell me the average {category} price."],
                 "SELECT AVG(price) FROM products WHERE category = '{category}'", pick(category=categories)),
        Template(["How many orders are {status}?", "Count the orders with status {status}.",
                  "Number of {status} orders?"],
                 ["What is the total number of orders whose status is '{status}'?"],
                 ["How many of our orders have the status {status}?", "Tell me the count of {status} orders."],
                 "SELECT COUNT(*) FROM orders WHERE status = '{status}'", pick(status=statuses)),
        Template(["How many orders has {customer} placed?", "Count the orders of {customer}.",
                  "Number of orders by customer {customer}?"],
                 ["How often has {customer} ordered from us?"],
                 ["How many times has {customer} placed an order?", "What is the order count for {customer}?"],
                 "SELECT COUNT(*) FROM orders JOIN customers ON orders.customer_id = customers.id "
                 "WHERE customers.name = '{customer}'", pick(customer=customers)),
        Template(["How many units of {product} were sold?", "Total quantity ordered of {product}?",
                  "Sum the quantity of {product} over all orders."],
                 ["What is the number of {product} units customers have bought in total?"],
                 ["How many {product} have we sold altogether?", "Total units of {product} across all orders?"],
                 "SELECT SUM(order_items.quantity) FROM order_items JOIN products ON order_items.product_id = "
                 "products.id WHERE products.name = '{product}'", pick(product=products)),
        Template(["Which customers joined in {year}?", "List customers who signed up in {year}.",
                  "Names of customers with a join date in {year}."],
                 ["Who became a customer during {year}?"],
                 ["Which customers have a joined_on date in {year}?", "Show the customers that joined us in {year}."],
                 "SELECT name FROM customers WHERE joined_on LIKE '{year}-%'", pick(year=years)),
        Template(["How many orders were placed in {year}?", "Count the orders from {year}.",
                  "Number of orders made in {year}?"],
                 ["What was the order volume (number of orders) in the year {year}?"],
                 ["How many orders do we have from {year}?", "Tell me how many orders were made during {year}."],
                 "SELECT COUNT(*) FROM orders WHERE ordered_on LIKE '{year}-%'", pick(year=years)),
        Template(["Which products cost between {low} and {high}?", "List products priced from {low} to {high}.",
                  "Products with a price between {low} and {high}?"],
                 ["Show me items whose price is at least {low} and at most {high}."],
                 ["Find products with prices in the range {low}-{high}.",
                  "Which items are priced between {low} and {high}?"],
                 "SELECT name FROM products WHERE price BETWEEN {low} AND {high}", price_range),
        Template(["Which cities in {country} have customers?", "List the distinct cities of customers in {country}.",
                  "In which {country} cities do our customers live?"],
                 ["Name each city of {country} where at least one customer is based."],
                 ["What cities in {country} do our customers come from?", "Distinct customer cities in {country}?"],
                 "SELECT DISTINCT city FROM customers WHERE country = '{country}'", pick(country=countries)),
        Template(["What is the total revenue of {status} orders?", "Sum of price times quantity for {status} orders?",
                  "Revenue from orders with status {status}?"],
                 ["How much money do the {status} orders add up to?"],
                 ["Total revenue from {status} orders?",
                  "What did the {status} orders earn in total (price x quantity)?"],
                 "SELECT SUM(order_items.quantity * products.price) FROM order_items JOIN products ON "
                 "order_items.product_id = products.id JOIN orders ON order_items.order_id = orders.id "
                 "WHERE orders.status = '{status}'", pick(status=statuses)),
        Template(["How many customers from {city} have an order with status {status}?",
                  "Count distinct {city} customers with {status} orders.",
                  "Number of customers in {city} who have a {status} order?"],
                 ["Among customers based in {city}, how many have at least one order that is {status}?"],
                 ["How many different customers in {city} have {status} orders?",
                  "Count the customers living in {city} who have an order marked {status}."],
                 "SELECT COUNT(DISTINCT customers.id) FROM customers JOIN orders ON orders.customer_id = "
                 "customers.id WHERE customers.city = '{city}' AND orders.status = '{status}'",
                 pick(city=cities, status=statuses)),
        Template(["How many products are in the {category} category?", "Count the {category} products.",
                  "Number of products in {category}?"],
                 ["What is the size of our {category} range, in products?"],
                 ["How many {category} products do we sell?",
                  "Tell me the number of products in the {category} category."],
                 "SELECT COUNT(*) FROM products WHERE category = '{category}'", pick(category=categories)),
        Template(["Which products did {customer} order?", "List the products ordered by {customer}.",
                  "Names of products in orders of {customer}?"],
                 ["What has {customer} bought from us (product names)?"],
                 ["Which products has {customer} purchased?", "Show the names of the products {customer} has ordered."],
                 "SELECT DISTINCT products.name FROM products JOIN order_items ON order_items.product_id = "
                 "products.id JOIN orders ON order_items.order_id = orders.id JOIN customers ON "
                 "orders.customer_id = customers.id WHERE customers.name = '{customer}'", pick(customer=customers)),
    ]


def line(question: str, sql: str) -> dict[str, object]:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": sql}]}


def make(seed: int = 0, train_per_template: int = 30, test_per_template: int = 8) -> tuple[list, list, list]:
    """(train lines, test lines, reinforcement lines); test value combinations and phrasings never appear in the
    other two. The reinforcement split asks the training split's value combinations in phrasings of its own."""
    rng = random.Random(seed)
    rl_rng = random.Random(seed + 1)  # its own stream, so train and test stay what they were before it existed
    db = sqlite3.connect(f"file:{DB_FILE}?mode=ro", uri=True)
    train, test, rl = [], [], []
    for template in templates(db):
        seen: set[tuple] = set()
        combos: list[dict[str, object]] = []
        for _ in range(2000):  # distinct value combinations, as many as the pools allow
            values = template.values(rng)
            key = tuple(sorted(values.items()))
            if key not in seen:
                seen.add(key)
                combos.append(values)
            if len(combos) == train_per_template + test_per_template:
                break
        held = min(test_per_template, max(1, len(combos) // 4))  # small pools (5 categories): a quarter to test
        kept = combos[held:][:train_per_template]
        for values in kept:  # few combinations (4 years): each with every training phrasing
            for phrasing in template.train if len(kept) < 10 else [rng.choice(template.train)]:
                train.append((phrasing.format(**values), template.sql.format(**values)))
            rl.append((rl_rng.choice(template.rl).format(**values), template.sql.format(**values)))
        for values in combos[:held]:
            test.append((rng.choice(template.test).format(**values), template.sql.format(**values)))
    for _, sql in train + test + rl:
        db.execute(sql).fetchall()  # a gold query that fails stops here
    rng.shuffle(train)
    rng.shuffle(test)
    rl_rng.shuffle(rl)
    return [line(*pair) for pair in train], [line(*pair) for pair in test], [line(*pair) for pair in rl]


def write(path: Path, lines: list[dict[str, object]]) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text("".join(json.dumps(item) + "\n" for item in lines), encoding="utf-8")
    staging.replace(path)


if __name__ == "__main__":
    train_lines, test_lines, rl_lines = make()
    write(HERE / "train.jsonl", train_lines)
    write(HERE / "test.jsonl", test_lines)
    write(HERE / "rl.jsonl", rl_lines)
    print(f"train: {len(train_lines)} lines, test: {len(test_lines)} lines, reinforcement: {len(rl_lines)} lines")
