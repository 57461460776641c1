#![allow(clippy::unwrap_used, clippy::expect_used)]
use till_token::*;

#[test]
fn smoke() {
    let root = RootKey::from_seed(&[1; 32]).unwrap();
    let key = mint(
        &root,
        Caveats {
            upstream: Some("openai".into()),
            cap: Some(3),
            paths: Some(vec!["/v1/chat".into()]),
            models: Some(vec!["gpt-4o-mini".into()]),
            expires: Some(2_000_000_000),
            methods: Some(vec!["POST".into(), "GET".into()]),
        },
    )
    .unwrap();
    println!("{}", key.to_key_string().unwrap());
    let (child, w) = key
        .attenuate(Caveats {
            cap: Some(2),
            methods: Some(vec!["POST".into()]),
            ..Default::default()
        })
        .unwrap();
    assert!(w.is_empty());
    let s = child.to_key_string().unwrap();
    let v = verify(&s, &KeyRing::with(root.public()), &Limits::default()).unwrap();
    println!("{v:?}");
    let req = RequestFacts {
        upstream: "openai",
        method: "POST",
        path: "/v1/chat/completions",
        model: Some("gpt-4o-mini"),
        now: 1_000,
    };
    v.authorize(&req, None, &Limits::default()).unwrap();
    v.authorize(&req, Some(&[3, 2]), &Limits::default())
        .unwrap();
    let e = v
        .authorize(&req, Some(&[3, 3]), &Limits::default())
        .unwrap_err();
    println!("{e}");
    let i = inspect(&s, None, &Limits::default()).unwrap();
    println!("{}", serde_json::to_string_pretty(&i).unwrap());
}
