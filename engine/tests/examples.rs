use std::path::Path;
#[test]
fn dump() {
    for p in ["quickstart.toml", "github-deploy.toml", "layered-bootstrap", "isolated-regions.toml", "broken/cycle-and-layer.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-examples").join(p);
        let parsed = depfence::policy::load(&path).unwrap();
        println!("== {p} syntax_ok={}", parsed.syntax_ok);
        for d in parsed.diagnostics.iter() { println!("P {}", d.to_plain(&parsed.policy.sources)); }
        let a = depfence::compile::analyze(&parsed.policy);
        for d in a.diagnostics.iter() { println!("A {}", d.to_plain(&parsed.policy.sources)); }
        println!("stages: {:?}", a.stages.iter().map(|s| (s.layer, s.components.iter().map(|&c| a.components[c].members.iter().map(|&m| a.name(m)).collect::<Vec<_>>()).collect::<Vec<_>>())).collect::<Vec<_>>());
        for e in &a.edges { println!("  {} -> {} crit={} {:?}", a.name(e.from), a.name(e.to), e.critical, e.kind); }
    }
}
