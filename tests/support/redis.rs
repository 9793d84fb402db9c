//! A small Redis client for assertions.

use fred::prelude::*;

pub fn url() -> String {
    std::env::var("POLYSYNC_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:56379".into())
}

pub struct TestRedis {
    pub client: Client,
}

impl TestRedis {
    pub async fn connect() -> TestRedis {
        let client = Builder::from_config(Config::from_url(&url()).unwrap()).build().unwrap();
        client.init().await.expect("connect to test redis");
        TestRedis { client }
    }

    pub async fn set(&self, key: &str, value: &str) {
        let _: () = self.client.set(key, value, None, None, false).await.unwrap();
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        self.client.get(key).await.unwrap()
    }

    pub async fn exists(&self, key: &str) -> bool {
        let n: i64 = self.client.exists(key).await.unwrap();
        n == 1
    }

    pub async fn hgetall(&self, key: &str) -> std::collections::HashMap<String, String> {
        self.client.hgetall(key).await.unwrap()
    }

    /// Keys matching a pattern (tests use unique prefixes, so SCAN-free KEYS is fine).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let v: Vec<String> = self
            .client
            .custom(fred::types::CustomCommand::new_static("KEYS", None, false), vec![pattern.to_string()])
            .await
            .unwrap();
        v
    }
}
