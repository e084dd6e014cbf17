pub struct DemoOptions { pub clinics: usize, pub duration: std::time::Duration, pub rate: f64, pub json: bool, pub chaos: bool, pub keep: bool }
pub struct Summary; impl Summary { pub fn ok(&self) -> bool { true } }
pub fn run(_o: DemoOptions) -> anyhow::Result<Summary> { Ok(Summary) }
