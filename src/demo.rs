//! The demo page and simulated generations (placeholder until the demo lands).

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::reply::Response;

use crate::routes::AppState;

/// `GET /`, `GET /client.js` and `POST /api/demo/tasks`.
pub fn routes(_state: AppState) -> BoxedFilter<(Response,)> {
    warp::any()
        .and_then(|| async { Err::<Response, _>(warp::reject::not_found()) })
        .boxed()
}
