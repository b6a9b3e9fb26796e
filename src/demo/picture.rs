//! The demo's pictures: the "generated image" of a finished task and the blurry previews
//! of one in progress. Each is a small SVG scene of the prompt's subject, with colours and
//! shapes varied by the task id; only numbers are interpolated into the markup.

use warp::http::header::{self, HeaderValue};
use warp::reply::Response;

use super::{PROMPTS, Rng, TOTAL_STEPS};
use crate::domain::{IdKind, TaskId};
use crate::error::Error;

/// `GET /demo/result/{task_id}.{prompt}.svg`: the finished picture (`prompt` is the
/// subject's index in [`PROMPTS`]; without it, one follows from the id).
pub(super) fn result_picture(file: &str) -> Result<Response, Error> {
    let raw = file.strip_suffix(".svg").ok_or(Error::RouteNotFound)?;
    let (raw, subject) = match raw.rsplit_once('.') {
        Some((id, digit)) if digit.len() == 1 && digit.as_bytes()[0].is_ascii_digit() => {
            (id, Some(usize::from(digit.as_bytes()[0] - b'0')))
        }
        _ => (raw, None),
    };
    let id = IdKind::Text.parse(raw)?;
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 256 160" width="512" height="320">
{}</svg>
"#,
        scene(id, subject)
    );
    Ok(svg_response(svg))
}

/// `GET /demo/preview/{task_id}.{prompt}.{step}.svg`: the picture as it looks at `step` of
/// [`TOTAL_STEPS`], at half the result's size, under a blur and a haze that thin out step
/// by step until, at the last step, it is the result. Anything else is a 404.
pub(super) fn preview_picture(file: &str) -> Result<Response, Error> {
    let (id, subject, step) = parse_preview(file).ok_or(Error::RouteNotFound)?;
    let left = f64::from(TOTAL_STEPS - step) / f64::from(TOTAL_STEPS);
    let blur = 12.0 * left;
    let haze = 0.7 * left;
    let svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 256 160" width="256" height="160">
<defs><filter id="soft" x="-10%" y="-10%" width="120%" height="120%"><feGaussianBlur stdDeviation="{blur:.1}"/></filter></defs>
<g filter="url(#soft)">
{}</g>
<rect width="256" height="160" fill="hsl(220,12%,62%)" fill-opacity="{haze:.2}"/>
</svg>
"#,
        scene(id, Some(subject))
    );
    Ok(svg_response(svg))
}

/// `{task_id}.{prompt}.{step}.svg`, each part checked: a prompt index of [`PROMPTS`], a step
/// of at most two digits up to [`TOTAL_STEPS`], and an id a table could have.
fn parse_preview(file: &str) -> Option<(TaskId, usize, u32)> {
    let raw = file.strip_suffix(".svg")?;
    let (rest, step) = raw.rsplit_once('.')?;
    let (id, subject) = rest.rsplit_once('.')?;
    let digits = |s: &str, max_len: usize| {
        !s.is_empty() && s.len() <= max_len && s.bytes().all(|b| b.is_ascii_digit())
    };
    if !digits(step, 2) || !digits(subject, 1) {
        return None;
    }
    let step: u32 = step.parse().ok().filter(|&s| s <= TOTAL_STEPS)?;
    let subject: usize = subject.parse().ok().filter(|&s| s < PROMPTS.len())?;
    let id = IdKind::Text.parse(id).ok()?;
    Some((id, subject, step))
}

fn svg_response(svg: String) -> Response {
    let mut response = Response::new(svg.into());
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    // A name always draws the same picture.
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=86400, immutable"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'"),
    );
    response
}

/// The scene of `subject` (its index in [`PROMPTS`]; out of range or `None`: one follows
/// from the id) for task `id`: the inside of a 256×160 `<svg>`.
fn scene(id: TaskId, subject: Option<usize>) -> String {
    // Any id a table may have (a UUID, an integer, text): a UUID's own bytes, else a hash.
    let bytes = uuid::Uuid::parse_str(id.as_str()).map_or_else(|_| spread(id), |u| u.into_bytes());
    let n = |i: usize| u32::from(bytes[i]);
    let subject = subject
        .filter(|&s| s < PROMPTS.len())
        .unwrap_or(n(11) as usize % PROMPTS.len());
    // Skies from cyan through violet to pink, a warm sun, muted green-to-teal land; night
    // and snow scenes change the palette. (Bytes 6 and 8 hold the UUID's version and
    // variant bits, so they are not used.)
    let night = matches!(subject, 3 | 4);
    let sky = if night {
        225 + n(0) % 40
    } else {
        180 + n(0) * 150 / 256
    };
    let (sky_l, sky2_l) = if night { (12, 30) } else { (60, 85) };
    let sun = 25 + n(1) % 30;
    let (land, land_s, land_l) = match subject {
        0 => (210, 20, 92),
        4 => (0, 0, 62),
        6 => (200 + n(9) % 20, 55, 45),
        _ => (90 + n(9) * 110 / 256, 25, 45),
    };
    let (sun_x, sun_y, sun_r) = (60 + n(2) * 140 / 256, 40 + n(3) % 40, 14 + n(4) % 14);
    let (peak_a, peak_b, peak_c) = (50 + n(5) % 40, 40 + n(7) % 50, 60 + n(10) % 40);
    let x = 70 + n(12) % 110;
    let hue = n(13) * 360 / 256;
    let subject_svg = match subject {
        // a red fox in fresh snow
        0 => format!(
            r##"<ellipse cx="{x}" cy="128" rx="26" ry="14" fill="hsl(22,85%,50%)"/><circle cx="{hx}" cy="112" r="11" fill="hsl(22,85%,50%)"/><path d="M{e1} 104 l4 -14 l6 12 Z M{e2} 104 l4 -14 l6 12 Z" fill="hsl(22,85%,40%)"/><path d="M{tx} 128 q-26 -4 -30 -22 q14 10 30 14 Z" fill="hsl(22,85%,55%)"/>"##,
            hx = x + 24,
            e1 = x + 15,
            e2 = x + 25,
            tx = x - 22,
        ),
        // a lighthouse at dusk
        1 => format!(
            r##"<path d="M{x} 150 l6 -80 h12 l6 80 Z" fill="#f4f1ea"/><path d="M{x1} 110 h17 v10 h-18 Z M{x2} 130 h21 v10 h-22 Z" fill="#c0392b"/><rect x="{x3}" y="58" width="14" height="12" fill="hsl(50,100%,70%)"/><path d="M{x4} 64 L256 40 L256 88 Z" fill="hsla(50,100%,80%,0.45)"/>"##,
            x1 = x + 3,
            x2 = x + 1,
            x3 = x + 5,
            x4 = x + 12,
        ),
        // a tiny robot watering plants
        2 => format!(
            r##"<rect x="{x}" y="100" width="30" height="34" rx="4" fill="hsl({hue},15%,70%)"/><rect x="{hx}" y="82" width="22" height="18" rx="3" fill="hsl({hue},15%,80%)"/><circle cx="{e1}" cy="91" r="3" fill="#2b6cb0"/><circle cx="{e2}" cy="91" r="3" fill="#2b6cb0"/><path d="M{px} 150 v-18 M{px2} 150 v-12" stroke="#2f855a" stroke-width="3"/><circle cx="{px}" cy="128" r="7" fill="#48bb78"/><circle cx="{px2}" cy="136" r="6" fill="#68d391"/>"##,
            hx = x + 4,
            e1 = x + 10,
            e2 = x + 20,
            px = x + 48,
            px2 = x + 62,
        ),
        // a neon city street in the rain
        3 => {
            let mut city = String::new();
            for i in 0..8u32 {
                let height = 40 + (n(i as usize % 16) + i * 37) % 70;
                let neon = (hue + i * 47) % 360;
                city.push_str(&format!(
                    r##"<rect x="{bx}" y="{by}" width="28" height="{height}" fill="#1a1b2e"/><rect x="{wx}" y="{wy}" width="16" height="4" fill="hsl({neon},100%,60%)"/>"##,
                    bx = i * 32,
                    by = 160 - height,
                    wx = i * 32 + 6,
                    wy = 170 - height,
                ));
            }
            city.push_str(r##"<path d="M20 10 l-6 24 M70 20 l-6 24 M130 5 l-6 24 M190 18 l-6 24 M240 8 l-6 24" stroke="hsla(200,80%,80%,0.6)" stroke-width="1.5"/>"##);
            city
        }
        // an astronaut cat on the moon
        4 => format!(
            r##"<circle cx="200" cy="40" r="18" fill="hsl(210,70%,55%)"/><rect x="{x}" y="108" width="26" height="28" rx="8" fill="#f7fafc"/><circle cx="{hx}" cy="96" r="16" fill="hsla(200,60%,85%,0.5)" stroke="#f7fafc" stroke-width="3"/><circle cx="{hx}" cy="98" r="9" fill="hsl(30,60%,55%)"/><path d="M{e1} 92 l3 -8 l4 7 Z M{e2} 92 l3 -8 l4 7 Z" fill="hsl(30,60%,45%)"/>"##,
            hx = x + 13,
            e1 = x + 5,
            e2 = x + 14,
        ),
        // a bowl of ramen, studio lighting
        5 => format!(
            r##"<path d="M{x0} 100 a50 40 0 0 0 100 0 Z" fill="hsl({hue},55%,45%)"/><ellipse cx="{cx}" cy="100" rx="50" ry="8" fill="hsl(40,70%,75%)"/><path d="M{n1} 100 q10 -30 20 0 M{n2} 100 q10 -30 20 0" stroke="hsl(45,80%,85%)" stroke-width="3" fill="none"/><circle cx="{egg}" cy="98" r="8" fill="#fff"/><circle cx="{egg}" cy="98" r="4" fill="hsl(40,95%,55%)"/>"##,
            x0 = x - 20,
            cx = x + 30,
            n1 = x,
            n2 = x + 14,
            egg = x + 52,
        ),
        // a paper boat on a quiet lake
        6 => format!(
            r##"<path d="M{x} 120 h50 l-10 14 h-30 Z" fill="#fdfdfd"/><path d="M{m} 120 l12 -26 l12 26 Z" fill="#edf2f7"/><path d="M{w1} 140 h40 M{w2} 148 h30" stroke="hsla(0,0%,100%,0.6)" stroke-width="2"/>"##,
            m = x + 13,
            w1 = x - 10,
            w2 = x + 20,
        ),
        // mountains at sunrise, watercolor: the landscape alone
        _ => String::new(),
    };
    format!(
        r##"<defs><linearGradient id="sky" x1="0" y1="0" x2="0" y2="1">
<stop offset="0" stop-color="hsl({sky},60%,{sky_l}%)"/><stop offset="1" stop-color="hsl({sky2},75%,{sky2_l}%)"/>
</linearGradient></defs>
<rect width="256" height="160" fill="url(#sky)"/>
<circle cx="{sun_x}" cy="{sun_y}" r="{sun_r}" fill="hsl({sun},95%,{sun_l}%)"/>
<path d="M0 160 L0 {a} L60 {b} L120 {c} L190 {d} L256 {e} L256 160 Z" fill="hsl({land},{land_s}%,{land_l}%)"/>
<path d="M0 160 L0 130 L70 112 L150 128 L256 108 L256 160 Z" fill="hsl({land},{land_s2}%,{land_l2}%)"/>
{subject_svg}
"##,
        sky2 = (sky + 25) % 360,
        sun_l = if night { 92 } else { 70 },
        land_s2 = land_s + 5,
        land_l2 = land_l * 2 / 3,
        a = 160 - peak_a,
        b = 160 - peak_b - 20,
        c = 160 - peak_c,
        d = 160 - peak_b,
        e = 160 - peak_a - 10,
    )
}

/// 16 bytes from any id (FNV-1a, then xorshift): a stable picture per task.
fn spread(id: TaskId) -> [u8; 16] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_str().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut rng = Rng(h | 1);
    std::array::from_fn(|_| rng.below(256) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: Response) -> String {
        let bytes =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn result_picture_needs_a_task_id_and_the_svg_suffix() {
        let task = TaskId::random();
        let ok = result_picture(&format!("{task}.svg")).unwrap();
        assert_eq!(ok.headers()["content-type"], "image/svg+xml");
        assert!(result_picture(&task.to_string()).is_err());
        assert!(result_picture("a,b.svg").is_err());
        assert!(result_picture(".svg").is_err());
        assert!(
            result_picture("42.svg").is_ok(),
            "integer ids have pictures too"
        );
    }

    #[test]
    fn each_prompt_gets_a_picture_of_its_own_subject() {
        let task = TaskId::random();
        let pictures: Vec<String> = (0..PROMPTS.len())
            .map(|i| body(result_picture(&format!("{task}.{i}.svg")).unwrap()))
            .collect();
        for (i, a) in pictures.iter().enumerate() {
            for b in &pictures[i + 1..] {
                assert_ne!(a, b, "two prompts drew the same picture for one task");
            }
        }
        // Without a prompt index the subject follows from the id, and a text id that ends
        // in ".<digit>" is still a picture.
        assert!(body(result_picture(&format!("{task}.svg")).unwrap()).starts_with("<svg"));
        assert!(result_picture("job.7.svg").is_ok());
    }

    #[test]
    fn preview_names_are_parsed_part_by_part() {
        let task = TaskId::random();
        assert_eq!(
            parse_preview(&format!("{task}.3.12.svg")),
            Some((task, 3, 12))
        );
        assert_eq!(
            parse_preview("42.0.0.svg"),
            Some((IdKind::Text.parse("42").unwrap(), 0, 0))
        );
        assert_eq!(
            parse_preview(&format!("{task}.7.30.svg")).map(|p| p.2),
            Some(30)
        );
        for nonsense in [
            format!("{task}.3.31.svg"),  // past the last step
            format!("{task}.3.012.svg"), // more than two digits
            format!("{task}.3.-1.svg"),
            format!("{task}.3.+1.svg"),
            format!("{task}.8.1.svg"), // no ninth prompt
            format!("{task}.12.1.svg"),
            format!("{task}.x.1.svg"),
            format!("{task}.3.1.png"),
            format!("{task}.3.1"),
            format!("{task}.3..svg"),
            format!("{task}.3.svg"), // a result's name
            ".3.1.svg".to_string(),
            "a,b.3.1.svg".to_string(),
            format!("{}.3.1.svg", "x".repeat(10_000)),
            String::new(),
        ] {
            assert_eq!(parse_preview(&nonsense), None, "{nonsense}");
            let refused = preview_picture(&nonsense).unwrap_err();
            assert!(
                matches!(refused, Error::RouteNotFound),
                "{nonsense}: {refused:?}"
            );
        }
    }

    #[test]
    fn a_preview_is_an_svg_that_sharpens_with_the_step() {
        let task = TaskId::random();
        let preview = |step: u32| preview_picture(&format!("{task}.5.{step}.svg")).unwrap();
        let first = preview(1);
        assert_eq!(first.headers()["content-type"], "image/svg+xml");
        let (first, middle, last) = (body(first), body(preview(15)), body(preview(30)));
        assert!(first.starts_with("<svg") && first.trim_end().ends_with("</svg>"));
        let blur = |svg: &str| -> f64 {
            let at = svg.find("stdDeviation=\"").unwrap() + "stdDeviation=\"".len();
            svg[at..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(blur(&first) > blur(&middle) && blur(&middle) > blur(&last));
        assert_eq!(blur(&last), 0.0, "the last step is the picture itself");
        // The same scene as the result's, under the blur.
        let result = body(result_picture(&format!("{task}.5.svg")).unwrap());
        let scene = result.lines().nth(1).unwrap();
        assert!(last.contains(scene), "the preview draws the result's scene");
    }
}
