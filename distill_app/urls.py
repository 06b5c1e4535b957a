from django.contrib.auth import views as auth_views
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import DefaultRouter

from . import api, pages

router = DefaultRouter()
router.register("projects", api.ProjectViewSet, basename="project")
router.register("datasets", api.DatasetViewSet, basename="dataset")
router.register("images", api.ImageViewSet, basename="image")
router.register("models", api.ModelCheckpointViewSet, basename="model")
router.register("inference-runs", api.InferenceRunViewSet, basename="inference-run")
router.register("reviews", api.ReviewViewSet, basename="review")
router.register("pseudo-label-sets", api.PseudoLabelSetViewSet, basename="pseudo-label-set")
router.register("training-runs", api.TrainingRunViewSet, basename="training-run")
router.register("evaluations", api.EvaluationViewSet, basename="evaluation")
router.register("jobs", api.JobViewSet, basename="job")

urlpatterns = [
    path("api/auth/token/", obtain_auth_token, name="api-token"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/", include(router.urls)),
    path("login/", auth_views.LoginView.as_view(template_name="distill/login.html"), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", pages.projects, name="projects"),
    path("projects/<int:pk>/", pages.project, name="project"),
    path("runs/<int:pk>/review/", pages.review, name="review"),
    path("training/<int:pk>/", pages.training, name="training"),
    path("healthz", pages.healthz, name="healthz"),
]
