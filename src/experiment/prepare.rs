//! Preparing a run: prompt sets rendered, the run's fingerprint checked against an existing
//! plan (resume), directions extracted or loaded, random controls drawn, residual norms and
//! steering calibration measured, the grid expanded and every edit checked, then
//! `plan.json` written last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::spec::{Builtins, Condition, DirectionSpec, Spec};
use crate::chat::{ChatTemplate, Prompt, SystemPrompt};
use crate::directions::import::{self, Convention, Stated};
use crate::directions::select::select_refusal;
use crate::directions::{self, Direction, DirectionFile, PersonaPositions, RefusalPositions};
use crate::error::{Empty, Error, ImportProblem, LayerOf, Named, PromptsProblem, Result, ValueOf};
use crate::fsio::write_atomic;
use crate::hooks::{LayerSet, Scope};
use crate::model::Model;
use crate::prompts::{self, Instruction};

use super::plan::{
    group_file, has_group_files, verify_group, GroupState, ModelRecord, Plan, Progress, Resolved,
    RunOptions, SetRecord,
};

fn sha_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    format!("{:x}", h.finalize())
}

fn rows_hash(d: &Direction) -> String {
    let mut h = Sha256::new();
    for r in &d.rows {
        for x in r {
            h.update(x.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

/// The system prompt a spec asks for.
pub fn system_of(spec: &Spec) -> SystemPrompt {
    match spec.system.as_deref() {
        None | Some("default") => SystemPrompt::TemplateDefault,
        Some("empty") => SystemPrompt::Empty,
        Some(t) => SystemPrompt::Text(t.to_string()),
    }
}

/// Loads every prompt set of the spec.
///
/// # Errors
/// Loader errors naming the set; an empty set.
pub fn load_sets(spec: &Spec) -> Result<BTreeMap<String, Vec<Instruction>>> {
    let mut out = BTreeMap::new();
    for (name, s) in &spec.prompts {
        let ctx = |e: Error| Error::Field {
            field: format!("prompts.{name}"),
            err: Box::new(e),
        };
        let mut v = prompts::load::resolve(&s.source, s.field.as_deref()).map_err(ctx)?;
        if let Some([a, b]) = s.range {
            if b > v.len() {
                return Err(Error::Prompts {
                    set: name.clone(),
                    from: s.source.clone(),
                    problem: PromptsProblem::Range {
                        start: a,
                        end: b,
                        have: v.len(),
                    },
                });
            }
            v = v.drain(a..b).collect();
        }
        let v = prompts::load::sample(v, s.n, s.seed).map_err(ctx)?;
        if v.is_empty() {
            return Err(Error::Prompts {
                set: name.clone(),
                from: s.source.clone(),
                problem: PromptsProblem::Empty,
            });
        }
        out.insert(name.clone(), v);
    }
    Ok(out)
}

/// The fingerprint of everything that determines results: spec, model, prompt texts, the
/// chat template and the prompts exactly as tokenised (so the template text, the system
/// prompt and the tokenizer are all covered), direction files, tool version, and how this
/// process computes ([`crate::model::ModelOptions::numerics`]).
fn fingerprint(
    spec: &Spec,
    model_sha: &str,
    sets: &BTreeMap<String, Vec<Instruction>>,
    template_src: &str,
    rendered: &BTreeMap<String, Vec<Prompt>>,
    numerics: &str,
) -> Result<String> {
    let spec_json = serde_json::to_vec(spec).map_err(|e| Error::Json {
        what: "spec".into(),
        reason: e.to_string(),
    })?;
    let mut parts: Vec<Vec<u8>> = vec![
        spec_json,
        model_sha.as_bytes().to_vec(),
        crate::VERSION.as_bytes().to_vec(),
        template_src.as_bytes().to_vec(),
        numerics.as_bytes().to_vec(),
    ];
    for (k, ps) in rendered {
        parts.push(k.as_bytes().to_vec());
        for p in ps {
            parts.push(p.tokens.iter().flat_map(|t| t.to_le_bytes()).collect());
        }
    }
    for (k, v) in sets {
        parts.push(k.as_bytes().to_vec());
        for i in v {
            parts.push(i.id.as_bytes().to_vec());
            parts.push(i.text.as_bytes().to_vec());
            parts.push(i.category.clone().unwrap_or_default().into_bytes());
        }
    }
    for d in spec.directions.values() {
        if let DirectionSpec::File { path, .. } = d {
            let (file, _) = import::split_stated(Path::new(path))?;
            parts.push(crate::model::file_sha256(&file)?.into_bytes());
            // refusal_direction's layer of a 1-D direction.pt lives beside it.
            let side = file
                .parent()
                .unwrap_or(Path::new("."))
                .join(import::SIDECAR);
            if side.is_file() {
                parts.push(crate::model::file_sha256(&side)?.into_bytes());
            }
        }
    }
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    Ok(sha_hex(&refs))
}

/// Everything needed to run groups: the plan plus what is not serialised.
pub struct Ready<'m> {
    pub plan: Plan,
    pub model: &'m Model,
    pub tmpl: ChatTemplate,
    pub prompts: BTreeMap<String, Vec<Prompt>>,
    pub instructions: BTreeMap<String, Vec<Instruction>>,
    pub directions: BTreeMap<String, Direction>,
}

fn render(
    model: &Model,
    tmpl: &ChatTemplate,
    spec: &Spec,
    v: &[Instruction],
) -> Result<Vec<Prompt>> {
    Prompt::render_all(
        model,
        tmpl,
        &system_of(spec),
        v.iter().map(|i| i.text.as_str()),
    )
}

/// The file of a spec's file direction and what the spec states about it: the path's own
/// `FILE:CONVENTION[.LAYER]` suffix, or `convention` and `layer`, not both.
fn file_source(
    path: &str,
    convention: Option<Convention>,
    layer: Option<usize>,
) -> Result<(PathBuf, Stated)> {
    let (file, mut stated) = import::split_stated(Path::new(path))?;
    if stated.convention.is_some() && (convention.is_some() || layer.is_some()) {
        return Err(Error::Import(ImportProblem::StatedTwice).in_file(&file));
    }
    stated.convention = stated.convention.or(convention);
    stated.layer = stated.layer.or(layer);
    Ok((file, stated))
}

fn load_file(
    path: &str,
    convention: Option<Convention>,
    layer: Option<usize>,
) -> Result<DirectionFile> {
    let (file, stated) = file_source(path, convention, layer)?;
    DirectionFile::load_stated(&file, &stated)
}

/// The `{refusal_layer}` a spec's file directions give by themselves: the layer of an
/// imported 1-D vector (refusal_direction's `direction.pt`) whose spec sets no
/// `refusal_layer`. Several that disagree are an error, not a choice.
///
/// # Errors
/// A file that does not load; two files with different layers.
fn layer_from_files(
    spec: &Spec,
    loaded: &BTreeMap<String, DirectionFile>,
) -> Result<Option<(String, usize)>> {
    let mut found: Option<(String, usize)> = None;
    for (name, d) in &spec.directions {
        let DirectionSpec::File {
            refusal_layer: None,
            ..
        } = d
        else {
            continue;
        };
        let Some(l) = loaded.get(name).and_then(DirectionFile::layer) else {
            continue;
        };
        match &found {
            Some((other, m)) if *m != l => {
                return Err(Error::Field {
                    field: format!("directions.{name}"),
                    err: Box::new(Error::Import(ImportProblem::LayerDefault {
                        layer: l,
                        other: other.clone(),
                        other_layer: *m,
                    })),
                })
            }
            Some(_) => {}
            None => found = Some((name.clone(), l)),
        }
    }
    Ok(found)
}

/// Placeholder built-ins for checking a spec before calibration has run; `file_layer` is
/// the `{refusal_layer}` file directions give by themselves ([`layer_from_files`]).
fn provisional(spec: &Spec, n_layer: usize, file_layer: Option<usize>) -> Result<Builtins> {
    let mut b = Builtins {
        n_layer,
        ..Default::default()
    };
    if let Some(s) = &spec.steer {
        b.steer_layer = Some(
            *LayerSet::parse(&s.layers, n_layer)
                .map_err(|e| Error::Field {
                    field: "steer.layers".into(),
                    err: Box::new(e),
                })?
                .first()
                .ok_or(Error::Empty(Empty::SteerLayers))?,
        );
        b.steer_coef = s.coefficients.first().copied();
    }
    for d in spec.directions.values() {
        if let DirectionSpec::File {
            refusal_layer: Some(l),
            ..
        } = d
        {
            b.refusal_layer = Some(*l);
        }
        if let DirectionSpec::Refusal { select, layer, .. } = d {
            if let Some(l) = layer {
                if *l >= n_layer {
                    return Err(Error::Layer {
                        layer: *l,
                        n_layer,
                        of: LayerOf::Refusal,
                    });
                }
                b.refusal_layer = Some(*l);
            } else if select.is_some() {
                b.refusal_layer = Some(0);
            }
        }
    }
    if b.refusal_layer.is_none() {
        b.refusal_layer = file_layer;
    }
    Ok(b)
}

fn ids_of(sets: &BTreeMap<String, Vec<Instruction>>) -> BTreeMap<String, Vec<String>> {
    sets.iter()
        .map(|(k, v)| (k.clone(), v.iter().map(|i| i.id.clone()).collect()))
        .collect()
}

/// Checks a spec against a model without running anything: returns the provisional grid.
///
/// Prompt sets by name, as a spec loads them.
pub type PromptSets = BTreeMap<String, Vec<Instruction>>;

/// The grid is expanded for every steering candidate, not only the first: windows relative to
/// `{steer_layer}` must fit whichever layer calibration picks.
///
/// # Errors
/// As [`Spec::expand`] and [`load_sets`]; an error for a later steering candidate names it.
pub fn check(spec: &Spec, model: &Model) -> Result<(PromptSets, Vec<Condition>)> {
    let sets = load_sets(spec).map_err(|e| spec.located(e))?;
    let ids = ids_of(&sets);
    // File directions are read and fitted here, so a dry run refuses one that does not fit,
    // and a 1-D vector's layer can stand for {refusal_layer}.
    let mut files = BTreeMap::new();
    for (name, d) in &spec.directions {
        if let DirectionSpec::File {
            path,
            convention,
            layer,
            ..
        } = d
        {
            let f = load_file(path, *convention, *layer)
                .and_then(|f| f.fit_model(&model.info))
                .map_err(|e| {
                    spec.located(Error::Field {
                        field: format!("directions.{name}"),
                        err: Box::new(e),
                    })
                })?;
            files.insert(name.clone(), f);
        }
    }
    let file_layer = layer_from_files(spec, &files)
        .map_err(|e| spec.located(e))?
        .map(|(_, l)| l);
    let conds = expand_provisional(spec, model.info.n_layer, file_layer, &ids)?;
    Ok((sets, conds))
}

/// The grid at the provisional built-ins, after checking that it also expands with each other
/// steering candidate as `{steer_layer}`.
fn expand_provisional(
    spec: &Spec,
    n_layer: usize,
    file_layer: Option<usize>,
    ids: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<Condition>> {
    let b = provisional(spec, n_layer, file_layer).map_err(|e| spec.located(e))?;
    let conds = spec.expand(&b, ids)?;
    if let Some(s) = &spec.steer {
        // `provisional` parsed these layers already.
        let candidates = LayerSet::parse(&s.layers, n_layer).map_err(|e| spec.located(e))?;
        for &l in candidates.iter().skip(1) {
            let bl = Builtins {
                steer_layer: Some(l),
                ..b.clone()
            };
            spec.expand(&bl, ids).map_err(|e| {
                let at = |e| Error::Field {
                    field: format!("with steer.layers candidate {l}"),
                    err: Box::new(e),
                };
                match e {
                    Error::Located { origin, err } => Error::Located {
                        origin,
                        err: Box::new(at(*err)),
                    },
                    e => at(e),
                }
            })?;
        }
    }
    Ok(conds)
}

/// Loads the plan of `dir` if it matches, or prepares one (extraction, selection,
/// calibration) and writes it. Progress goes to `progress`; one-line notes to `note`.
///
/// # Errors
/// A run directory holding another run; any preparation error.
pub fn prepare<'m>(
    spec: &Spec,
    model: &'m Model,
    dir: &Path,
    opts: &RunOptions,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<Ready<'m>> {
    let (sets, _) = check(spec, model)?;
    let model_sha = model.sha256()?;
    let mut tmpl = ChatTemplate::for_model(model, opts.template.clone())?;
    tmpl.set_special_tokens(opts.special);
    let mut rendered = BTreeMap::new();
    for (k, v) in &sets {
        rendered.insert(
            k.clone(),
            render(model, &tmpl, spec, v).map_err(|e| Error::Field {
                field: format!("prompts.{k}"),
                err: Box::new(e),
            })?,
        );
    }
    let template_src = opts
        .template
        .clone()
        .or_else(|| model.info.chat_template.clone())
        .unwrap_or_default();
    let fp = fingerprint(
        spec,
        &model_sha,
        &sets,
        &template_src,
        &rendered,
        &model.options.numerics(),
    )?;
    if let Some((plan, directions)) = resume(dir, &fp, model, note)? {
        return Ok(Ready {
            plan,
            model,
            tmpl,
            prompts: rendered,
            instructions: sets,
            directions,
        });
    }
    let t0 = Instant::now();
    let mut resolved = Resolved {
        steer_layer: None,
        steer_coef: None,
        refusal_layer: None,
        refusal_selection: None,
        calibration: vec![],
        calibration_baseline: None,
        resid_norms: BTreeMap::new(),
    };
    let (dirs, seeds) = directions_for(
        spec,
        model,
        &tmpl,
        &sets,
        &rendered,
        &mut resolved,
        progress,
        note,
    )?;
    if spec.uses_scale_resid() {
        resolved.resid_norms = residual_norms(spec, model, &rendered, progress)?;
    }
    // Steering calibration (score mode: first-token refusal score only).
    if let Some(s) = &spec.steer {
        let norms = resolved.resid_norms.get(&s.prompts).cloned();
        super::calibrate::calibrate(
            s,
            model,
            &dirs[&s.direction],
            &rendered[&s.prompts],
            norms,
            &mut resolved,
            progress,
            note,
        )?;
    }
    let plan = plan_for(spec, model, fp, model_sha, &sets, resolved, &dirs, seeds)?;
    check_edits(&plan, &dirs)?;
    write_prepared(dir, &plan, &dirs, model)?;
    note(format!("prepared in {:.1}s", t0.elapsed().as_secs_f64()));
    Ok(Ready {
        plan,
        model,
        tmpl,
        prompts: rendered,
        instructions: sets,
        directions: dirs,
    })
}

/// The plan and directions of a run directory prepared before with the same fingerprint;
/// None for a fresh directory.
///
/// # Errors
/// The directory holds another run (another fingerprint, foreign group files, or group files
/// without a plan).
fn resume(
    dir: &Path,
    fp: &str,
    model: &Model,
    note: &mut dyn FnMut(String),
) -> Result<Option<(Plan, BTreeMap<String, Direction>)>> {
    let plan_path = dir.join("plan.json");
    let dirs_path = dir.join("prepared.safetensors");
    if !plan_path.exists() && has_group_files(dir) {
        return Err(Error::file(
            dir,
            "holds group files but no plan.json, so they cannot be checked against this run; use a new --out directory",
        ));
    }
    if plan_path.exists() {
        let (_, plan) = Plan::read(dir)?;
        if plan.fingerprint != fp {
            return Err(Error::file(
                dir,
                format!(
                    "holds a run with another spec, model, prompt set, chat template or way of computing (this process: {}); use a new --out directory",
                    model.options.numerics()
                ),
            ));
        }
        let directions = if plan.direction_hashes.is_empty() {
            BTreeMap::new()
        } else {
            DirectionFile::load(&dirs_path)?
                .directions
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect()
        };
        // Foreign rows are refused before anything else is said or done.
        for g in 0..plan.n_groups {
            if let GroupState::Foreign(id) = verify_group(&plan, dir, g) {
                return Err(Error::file(
                    group_file(dir, g),
                    format!(
                        "holds rows of run {id}, not of this run ({}); use a new --out directory",
                        plan.run_id
                    ),
                ));
            }
        }
        note(format!("resuming {}: plan.json matches", dir.display()));
        return Ok(Some((plan, directions)));
    }
    Ok(None)
}

/// The spec's directions by name: loaded from files, extracted (refusal, with layer
/// selection when asked, and persona), then random controls (which may match another's
/// norms). The refusal layer and how it was chosen go into `resolved`.
///
/// # Errors
/// Unreadable or mismatched files, extraction and selection errors, non-finite rows.
#[allow(clippy::too_many_arguments)]
fn directions_for(
    spec: &Spec,
    model: &Model,
    tmpl: &ChatTemplate,
    sets: &PromptSets,
    rendered: &BTreeMap<String, Vec<Prompt>>,
    resolved: &mut Resolved,
    progress: &mut Progress<'_>,
    note: &mut dyn FnMut(String),
) -> Result<(BTreeMap<String, Direction>, BTreeMap<String, u64>)> {
    let nl = model.info.n_layer;
    let ne = model.info.n_embd;
    // Directions: non-random first, then random ones (which may match another's norms).
    let mut dirs: BTreeMap<String, Direction> = BTreeMap::new();
    let mut seeds = BTreeMap::new();
    let mut file_dirs: BTreeMap<String, DirectionFile> = BTreeMap::new();
    for (name, d) in &spec.directions {
        let ctx = |e: Error| Error::Field {
            field: format!("directions.{name}"),
            err: Box::new(e),
        };
        let dir = match d {
            DirectionSpec::File {
                path,
                name: n,
                refusal_layer,
                convention,
                layer,
            } => {
                let f = load_file(path, *convention, *layer)
                    .and_then(|f| f.fit_model(&model.info))
                    .map_err(ctx)?;
                if let Some(l) = refusal_layer {
                    resolved.refusal_layer = Some(*l);
                    resolved.refusal_selection =
                        Some(format!("given with the direction file: layer {l}"));
                }
                let d = f.get(n.as_deref()).map_err(ctx)?.clone();
                file_dirs.insert(name.clone(), f);
                d
            }
            DirectionSpec::Refusal {
                harmful,
                harmless,
                select,
                layer,
            } => {
                progress("extract", 0, 1, name);
                let f = directions::extract_refusal(
                    model,
                    tmpl,
                    &system_of(spec),
                    &sets[harmful],
                    &sets[harmless],
                    RefusalPositions::Last,
                )
                .map_err(ctx)?;
                progress("extract", 1, 1, name);
                if let Some(s) = select {
                    let layers = match &s.layers {
                        Some(l) => LayerSet::parse(l, nl)
                            .map_err(|e| Error::Field {
                                field: format!("directions.{name}.select.layers"),
                                err: Box::new(e),
                            })?
                            .into_vec(),
                        None => (0..nl)
                            .filter(|&l| {
                                (l as f64) < directions::select::MAX_LAYER_FRACTION * nl as f64
                            })
                            .collect(),
                    };
                    let sel = select_refusal(
                        model,
                        &f,
                        &rendered[&s.harmful],
                        &rendered[&s.harmless],
                        &layers,
                        4,
                        &mut |d, t| progress("select", d, t, name),
                    )
                    .map_err(ctx)?;
                    let (l, how) = match sel.chosen {
                        Some(i) => (sel.candidates[i].layer, sel.explain()),
                        None => {
                            // Nothing passed Arditi's filters (a model that barely refuses):
                            // fall back to the lowest bypass score below 80% depth, and say so.
                            let c = sel
                                .candidates
                                .iter()
                                .filter(|c| {
                                    (c.layer as f64)
                                        < directions::select::MAX_LAYER_FRACTION * nl as f64
                                })
                                .min_by(|a, b| a.bypass.total_cmp(&b.bypass))
                                .unwrap_or(&sel.candidates[0]);
                            (c.layer, format!("no candidate passed the filters; fell back to the lowest bypass score, layer {} ({:.3})", c.layer, c.bypass))
                        }
                    };
                    note(format!("refusal layer {l}: {how}"));
                    resolved.refusal_layer = Some(l);
                    resolved.refusal_selection = Some(how);
                } else if let Some(l) = layer {
                    resolved.refusal_layer = Some(*l);
                    resolved.refusal_selection = Some(format!("fixed by the spec: layer {l}"));
                }
                f.directions[0].clone()
            }
            DirectionSpec::Persona {
                persona,
                personas,
                questions,
            } => {
                let src = match personas {
                    Some(p) => crate::fsio::read_text(Path::new(p), "a personas TOML file")?,
                    None => prompts::PERSONAS.to_string(),
                };
                let all = prompts::parse_personas(
                    &src,
                    personas.as_deref().unwrap_or("built-in personas"),
                )
                .map_err(ctx)?;
                let p = all.get(persona).ok_or_else(|| Error::Field {
                    field: format!("directions.{name}.persona"),
                    err: Box::new(Error::Unknown {
                        what: Named::Persona,
                        name: Some(persona.clone()),
                        known: all.keys().cloned().collect(),
                    }),
                })?;
                progress("extract", 0, 1, name);
                let f = directions::extract_persona(
                    model,
                    tmpl,
                    persona,
                    p,
                    &sets[questions],
                    PersonaPositions::Last,
                )
                .map_err(ctx)?;
                progress("extract", 1, 1, name);
                f.directions[0].clone()
            }
            DirectionSpec::Random { .. } => continue,
        };
        dirs.insert(
            name.clone(),
            Direction {
                name: name.clone(),
                rows: dir.rows,
            },
        );
    }
    if resolved.refusal_layer.is_none() {
        if let Some((name, l)) = layer_from_files(spec, &file_dirs)? {
            let src = file_dirs[&name]
                .meta
                .get(import::SOURCE_LAYER)
                .cloned()
                .unwrap_or_default();
            let how = format!("the layer of directions.{name}'s 1-D vector: resid_post.{l}, {src}");
            note(format!("refusal layer {l}: {how}"));
            resolved.refusal_layer = Some(l);
            resolved.refusal_selection = Some(how);
        }
    }
    for (name, d) in &spec.directions {
        if let DirectionSpec::Random { seed, like } = d {
            let norms = like.as_ref().map(|l| dirs[l].norms());
            let r = directions::random(*seed, nl, ne, norms.as_deref());
            dirs.insert(
                name.clone(),
                Direction {
                    name: name.clone(),
                    rows: r.rows,
                },
            );
            seeds.insert(name.clone(), *seed);
        }
    }
    for (name, d) in &dirs {
        if let Some(l) = d.rows.iter().position(|r| r.iter().any(|x| !x.is_finite())) {
            let value = d.rows[l].iter().find(|x| !x.is_finite()).copied();
            return Err(Error::Value {
                what: ValueOf::Prepared(name.clone()),
                layer: l,
                value: value.map_or(f64::NAN, f64::from),
            });
        }
    }
    Ok((dirs, seeds))
}

/// The mean residual norm at each layer over each prompt set an experiment or the steering
/// calibration uses, for coefficients relative to them (`scale = "resid"`).
///
/// # Errors
/// Engine errors.
fn residual_norms(
    spec: &Spec,
    model: &Model,
    rendered: &BTreeMap<String, Vec<Prompt>>,
    progress: &mut Progress<'_>,
) -> Result<BTreeMap<String, Vec<f64>>> {
    let mut out = BTreeMap::new();
    let mut names: Vec<&String> = spec.experiment.iter().map(|e| &e.prompts).collect();
    if let Some(s) = &spec.steer {
        names.push(&s.prompts);
    }
    names.sort();
    names.dedup();
    let mut session = model.session()?;
    for n in names {
        progress("norms", 0, 1, n);
        out.insert(
            n.clone(),
            crate::experiment::steer::resid_norms(&mut session, &rendered[n])?,
        );
    }
    Ok(out)
}

/// The plan of a fresh run: the grid expanded with what preparation resolved, the prompt
/// sets' records, the model's, and the directions' hashes and seeds.
///
/// # Errors
/// Grid expansion errors.
#[allow(clippy::too_many_arguments)]
fn plan_for(
    spec: &Spec,
    model: &Model,
    fp: String,
    model_sha: String,
    sets: &PromptSets,
    resolved: Resolved,
    dirs: &BTreeMap<String, Direction>,
    seeds: BTreeMap<String, u64>,
) -> Result<Plan> {
    let nl = model.info.n_layer;
    let ne = model.info.n_embd;
    let b = Builtins {
        n_layer: nl,
        steer_layer: resolved.steer_layer,
        steer_coef: resolved.steer_coef,
        refusal_layer: resolved.refusal_layer,
    };
    let conditions = spec.expand(&b, &ids_of(sets))?;
    let n_pairs: usize = conditions
        .iter()
        .map(|c| sets[&c.prompts].len())
        .sum::<usize>()
        * spec.generation.samples.max(1);
    let set_records = spec
        .prompts
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                SetRecord {
                    source: s.source.clone(),
                    count: sets[k].len(),
                    sha256: prompts::load::hash(&sets[k]),
                },
            )
        })
        .collect();
    let file = model
        .info
        .path
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().into_owned());
    Ok(Plan {
        run_id: fp[..12].to_string(),
        fingerprint: fp,
        tool_version: crate::VERSION.to_string(),
        spec: spec.clone(),
        model: ModelRecord {
            file,
            sha256: model_sha,
            quant: model.info.file_type.clone(),
            arch: model.info.arch.clone(),
            n_layer: nl,
            n_embd: ne,
        },
        sets: set_records,
        resolved,
        n_groups: n_pairs.div_ceil(spec.group_size),
        n_pairs,
        conditions,
        direction_hashes: dirs
            .iter()
            .map(|(k, d)| (k.clone(), rows_hash(d)))
            .collect(),
        direction_seeds: seeds,
    })
}

/// Every edit of the plan checked before anything is written: a zero-norm projection
/// direction or an add that overflows would otherwise surface only when its group runs.
///
/// # Errors
/// The first condition whose edit cannot be applied, naming it, its intervention and layer.
fn check_edits(plan: &Plan, dirs: &BTreeMap<String, Direction>) -> Result<()> {
    for cond in &plan.conditions {
        let norms = plan.resolved.resid_norms.get(&cond.prompts);
        for (k, iv) in cond.interventions.iter().enumerate() {
            let d = &dirs[&iv.direction];
            crate::experiment::steer::edit(
                &cond.id,
                k + 1,
                d,
                iv,
                norms.map(Vec::as_slice),
                Scope::All,
            )?;
        }
    }
    Ok(())
}

/// Writes a fresh run's directions (`prepared.safetensors`) and then `plan.json`, whose
/// presence means the preparation is complete.
///
/// # Errors
/// I/O errors, naming the file.
fn write_prepared(
    dir: &Path,
    plan: &Plan,
    dirs: &BTreeMap<String, Direction>,
    model: &Model,
) -> Result<()> {
    let plan_path = dir.join("plan.json");
    let dirs_path = dir.join("prepared.safetensors");
    std::fs::create_dir_all(dir.join("groups")).map_err(|e| Error::io(dir, e))?;
    let mut meta = BTreeMap::new();
    meta.insert("kind".into(), "experiment".into());
    meta.insert("arch".into(), model.info.arch.clone());
    meta.insert("model_sha256".into(), plan.model.sha256.clone());
    meta.insert("run_id".into(), plan.run_id.clone());
    if !dirs.is_empty() {
        let f = DirectionFile::new(dirs.values().cloned().collect(), meta)?;
        write_atomic(&dirs_path, &f.to_bytes()).map_err(|e| Error::io(&dirs_path, e))?;
    }
    let json = serde_json::to_vec_pretty(plan).map_err(|e| Error::Json {
        what: "plan".into(),
        reason: e.to_string(),
    })?;
    // plan.json last: its presence means the preparation is complete.
    write_atomic(&plan_path, &json).map_err(|e| Error::io(&plan_path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
name = "t"
[prompts.h]
source = "builtin:harmful"
[directions.p]
kind = "random"
seed = 1
[steer]
direction = "p"
prompts = "h"
layers = "2,6"
coefficients = [4]
[[experiment]]
id = "E3"
prompts = "h"
sweep = { after = [1, 2] }
intervention = [ { direction = "p", op = "project", layers = "{steer_layer + after}+WIDTH" } ]
"#;

    #[test]
    fn windows_relative_to_the_steering_layer_fit_every_candidate() {
        let spec = |w: &str| Spec::parse(&SPEC.replace("WIDTH", w), "t.toml").unwrap();
        let ids = BTreeMap::new();
        // The grid returned is the first candidate's (2): windows 3-4 and 4-5.
        let c = expand_provisional(&spec("2"), 10, None, &ids).unwrap();
        assert_eq!(c[0].interventions[0].layers, [3, 4]);
        assert_eq!(c[1].interventions[0].layers_text(), "4-5");
        let c = expand_provisional(&spec("tail"), 10, None, &ids).unwrap();
        assert_eq!(c[0].interventions[0].layers_text(), "3-9");
        // 6 + 2 + 3 layers overflow 10 layers: found before calibration, naming the candidate.
        let e = expand_provisional(&spec("3"), 10, None, &ids)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.toml: with steer.layers candidate 6: E3[after=2]: intervention 1: layers: layers '8-10': layer 10 out of range (10 layers, 0-9)"
        );
    }
}
