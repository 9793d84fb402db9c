-- The e-commerce schema of the demo: carts and orders in Aurora/PostgreSQL.
CREATE TABLE IF NOT EXISTS products (
    id          bigint PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    description text,
    price       numeric(12,2) NOT NULL,
    stock       integer NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS carts (
    id          bigint PRIMARY KEY,
    user_id     bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE carts REPLICA IDENTITY FULL;
CREATE TABLE IF NOT EXISTS cart_items (
    cart_id     bigint NOT NULL REFERENCES carts(id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES products(id),
    qty         integer NOT NULL,
    PRIMARY KEY (cart_id, product_id)
);
CREATE TABLE IF NOT EXISTS orders (
    id          bigint PRIMARY KEY,
    user_id     bigint NOT NULL,
    status      text NOT NULL,
    region      text NOT NULL DEFAULT 'eu-west-1',
    total       numeric(12,2) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE IF NOT EXISTS order_items (
    order_id    bigint NOT NULL REFERENCES orders(id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES products(id),
    user_id     bigint NOT NULL,  -- denormalised from orders for the purchase graph
    qty         integer NOT NULL,
    price       numeric(12,2) NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
ALTER TABLE order_items REPLICA IDENTITY FULL;
